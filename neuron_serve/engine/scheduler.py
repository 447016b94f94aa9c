"""Which requests run: the waiting queue, the slots, and what each engine step does with them.

Pure policy, as nano-vllm's scheduler: no threads, no clocks, no metrics, no model. The engine asks
it for a step and tells it what finished. The policy is Sarathi-Serve's stall-free batching over the
compiled slots and the graph set's token budget (``artifact/graphs.py``):

1. every request whose prompt is in the cache decodes one token;
2. the rest of the budget goes to prompts: first the one prompt cut short by the last step, then
   waiting requests, each taking the lowest free slot, whole if it fits and cut otherwise. So a long
   prompt is spread over steps and no running stream ever waits more than one step for its next
   token, and only the last prompt of a step is ever cut.

Waiting requests are admitted by start-time fair queueing over their tenants (Goyal, Vin and Cheng,
1996): a request's tag is the later of the queue's virtual time and its tenant's previous tag plus
1 / weight, and the smallest tag goes first (arrival order among equals, and for a single tenant).
A tenant that floods the queue only pushes its own tags out: another tenant's next request is
admitted after at most one admission per other tenant waiting (weighted), not behind the flood.

With ``shortest_first`` (the recipe's ``serve.prefill_order = "shortest-first"``), prompts that fit whole
in what is left of a step's prompt budget, and are shorter than what the first in line (the prompt being
prefilled, else the queue's head) still has to run, go before it: shortest remaining prompt first,
which minimises the mean time to first token when prompt lengths are skewed. They come from the queue in
tag order, whole, so only the first in line or the last prompt of a step is ever cut. The first in line
is passed over in at most every other step: a long prompt is at most twice as slow to prefill, never
starved by a stream of short ones.

The lowest free slot keeps busy slots low, so a step's decode rows (up to its highest decoding slot)
stay near the number of streams without moving any cache row.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.engine.sequence import Sequence
from neuron_serve.model.step import PromptChunk, StepBatch


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the client should retry later."""


@dataclass
class StepPlan:
    """One step: the batch for the runner, and whose tokens each of its logit rows is."""

    batch: StepBatch
    decoding: list[Sequence]  # aligned with batch.decode_slots
    prompting: list[Sequence]  # aligned with batch.chunks
    cancelled: list[Sequence] = field(default_factory=list)  # dropped from the queue before a slot

    def finishes_prompt(self, index: int) -> bool:
        """Whether the step's `index`-th chunk is the end of its prompt (its logits give a token)."""
        seq, chunk = self.prompting[index], self.batch.chunks[index]
        return chunk.start + len(chunk.tokens) == len(seq.prompt_ids)


class Scheduler:
    def __init__(self, graphs: GraphSet, max_waiting: int, shortest_first: bool = False):
        self.graphs = graphs
        self.shortest_first = shortest_first
        self.passed_over: Sequence | None = None  # the first in line that the last step went without
        self.slots: list[Sequence | None] = [None] * graphs.batch_size
        self.waiting: list[tuple[float, int, Sequence]] = []  # a heap of (tag, arrival, request)
        self.prefilling: list[Sequence] = []  # in slots, prompt not all in the cache; arrival order
        self.max_waiting = max_waiting
        self.virtual_time = 0.0  # the tag of the last request admitted
        self.next_tag: dict[str, float] = {}  # per tenant: the earliest tag its next request may have
        self.arrivals = itertools.count()

    @property
    def busy(self) -> int:
        return sum(s is not None for s in self.slots)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.busy > 0

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
        tag = max(self.virtual_time, self.next_tag.get(seq.tenant, 0.0))
        self.next_tag[seq.tenant] = tag + 1.0 / seq.weight
        heapq.heappush(self.waiting, (tag, next(self.arrivals), seq))

    def schedule(self) -> StepPlan:
        """The next step; its batch is empty when nothing can run."""
        decoding = [s for s in self.slots if s is not None and s not in self.prefilling]
        batch = StepBatch(
            [s.slot for s in decoding], [s.output_ids[-1] for s in decoding], [s.position for s in decoding]
        )
        plan = StepPlan(batch, decoding, [])
        budget = self.graphs.prompt_budget(len(decoding))
        first = self._first_in_line()
        if self.shortest_first and first is not None and first is not self.passed_over:
            budget = self._shorter_first(plan, budget, len(first.prompt_ids) - first.prompt_computed)
        started = [s for s in self.prefilling if s.prompt_computed < len(s.prompt_ids)]
        while budget > 0 and len(plan.prompting) < self.graphs.max_prompts:
            seq = started.pop(0) if started else self._admit(plan)
            if seq is None:
                break
            budget -= self._add_chunk(plan, seq, budget)
        self.passed_over = first if plan.prompting and first not in plan.prompting else None
        return plan

    def _first_in_line(self) -> Sequence | None:
        """The prompt being prefilled (at most one, cut by the last step), else the queue's head."""
        if self.prefilling:
            return self.prefilling[0]
        return self.waiting[0][2] if self.waiting else None

    def _shorter_first(self, plan: StepPlan, budget: int, first_left: int) -> int:
        """Admit waiting prompts, in tag order, that fit whole in `budget` and are shorter than the
        `first_left` tokens the first in line has to run; returns the budget left."""
        while len(plan.prompting) < self.graphs.max_prompts and None in self.slots:
            fits = min(budget, first_left - 1)
            entry = min((e for e in self.waiting if len(e[2].prompt_ids) <= fits), default=None)
            if entry is None:
                return budget
            self.waiting.remove(entry)
            heapq.heapify(self.waiting)
            seq = entry[2]
            if seq.cancelled.is_set():
                plan.cancelled.append(seq)
                continue
            self._take_slot(seq)
            budget -= self._add_chunk(plan, seq, budget)
        return budget

    @staticmethod
    def _add_chunk(plan: StepPlan, seq: Sequence, budget: int) -> int:
        """The next `budget` tokens (at most) of `seq`'s prompt go into the step; returns how many."""
        start = seq.prompt_computed
        tokens = seq.prompt_ids[start : start + budget]
        seq.prompt_computed += len(tokens)
        plan.batch.chunks.append(PromptChunk(seq.slot, start, tokens))
        plan.prompting.append(seq)
        return len(tokens)

    def _admit(self, plan: StepPlan) -> Sequence | None:
        """The waiting request with the smallest tag that is still wanted, in the lowest free slot; None when
        no slot is free or nothing waits. Requests cancelled while they waited go to `plan.cancelled`."""
        while self.waiting and None in self.slots:
            tag, _, seq = heapq.heappop(self.waiting)
            self.virtual_time = tag
            if seq.cancelled.is_set():
                plan.cancelled.append(seq)
                continue
            self._take_slot(seq)
            return seq
        return None

    def _take_slot(self, seq: Sequence) -> None:
        seq.slot = self.slots.index(None)
        self.slots[seq.slot] = seq
        self.prefilling.append(seq)

    def prompt_done(self, seq: Sequence) -> None:
        """`seq`'s prompt is all in the cache: it decodes from the next step on."""
        self.prefilling.remove(seq)

    def take_cancelled(self) -> list[Sequence]:
        """Running requests whose client left; their slots are free from now on."""
        cancelled = [s for s in self.slots if s is not None and s.cancelled.is_set()]
        for seq in cancelled:
            self.release(seq)
        return cancelled

    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def release(self, seq: Sequence) -> None:
        self.slots[seq.slot] = None
        if seq in self.prefilling:
            self.prefilling.remove(seq)
