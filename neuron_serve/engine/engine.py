"""The engine: one thread per model replica that loops schedule, run, sample, emit.

The scheduler (``scheduler.py``) decides what each step runs, the runner (a forward process, or any
`backends.base.Runner`) runs it as one graph call, the sampler picks the tokens of the decoding
requests and of the prompts the step finished, and each `Sequence` streams its text. The engine
itself only keeps time: metrics, each request's timestamps and a record of its last steps.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import torch

from neuron_serve.backends.base import Forward, Runner
from neuron_serve.engine.metrics import Metrics
from neuron_serve.engine.sampler import sample_tokens
from neuron_serve.engine.scheduler import Scheduler, StepPlan
from neuron_serve.engine.sequence import Sequence

log = logging.getLogger("neuron_serve.engine")
STEP_RECORDS = 4096  # the last steps, for tests and debugging


@dataclass(frozen=True)
class StepRecord:
    """What one engine step ran: which requests decoded, which prompt chunks went in, how long it took."""

    decoded: tuple[str, ...]  # request ids
    chunks: tuple[tuple[str, int, int], ...]  # (request id, start, tokens)
    seconds: float

    @classmethod
    def of(cls, plan: StepPlan, seconds: float) -> StepRecord:
        chunks = zip(plan.prompting, plan.batch.chunks, strict=True)
        decoded = tuple(s.request_id for s in plan.decoding)
        return cls(decoded, tuple((s.request_id, c.start, len(c.tokens)) for s, c in chunks), seconds)


class Engine:
    def __init__(
        self,
        runner: Runner,
        metrics: Metrics,
        max_waiting: int,
        kernels: frozenset[str] = frozenset(),
        shortest_first: bool = False,
    ):
        """`kernels`: the artifact recipe's enabled kernels; the engine uses "sampling". `shortest_first`:
        the scheduler's prompt order (``scheduler.py``)."""
        self.runner = runner
        self.metrics = metrics
        self.fused_sampling = "sampling" in kernels
        self.scheduler = Scheduler(runner.graphs, max_waiting, shortest_first)
        self.steps: collections.deque[StepRecord] = collections.deque(maxlen=STEP_RECORDS)
        self.condition = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="neuron-serve-engine", daemon=True)

    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.condition:
            self.stopped = True
            self.condition.notify()
        self.thread.join(timeout=30)

    def submit(self, seq: Sequence) -> None:
        """Queue a request; raises `QueueFullError` at the queue's bound."""
        with self.condition:
            self.scheduler.add(seq)
            self.metrics.waiting.set(len(self.scheduler.waiting))
            self.condition.notify()

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.stopped and not self.scheduler.has_work():
                    self.metrics.idle()
                    self.condition.wait(timeout=1.0)
                if self.stopped:
                    return
                plan = self.scheduler.schedule()
                self._count_slots()
            try:
                for seq in plan.cancelled:  # left while queued: counted, but no latency to observe
                    seq.finish("cancelled")
                    self.metrics.finished.labels(self.metrics.model_name, "cancelled").inc()
                if plan.batch.decode_slots or plan.batch.chunks:
                    self._step(plan)
                for seq in self.scheduler.take_cancelled():
                    seq.finish("cancelled")
                    self._finished(seq)
            except Exception as error:  # a failed forward must not take the replica down
                log.exception("engine step failed")
                self._fail_all(f"internal error in the engine: {error}")

    def _count_slots(self) -> None:
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.running.set(self.scheduler.busy)

    def _step(self, plan: StepPlan) -> None:
        batch = plan.batch
        started = time.perf_counter()
        for seq, chunk in zip(plan.prompting, batch.chunks, strict=True):
            if chunk.start == 0:
                seq.scheduled_at = started
                self.metrics.queue_time.observe(started - seq.arrival)
                self.metrics.traffic["request_prompt_tokens"].observe(len(seq.prompt_ids))
        forward = self.runner.step(batch)
        elapsed = self._ran(forward, started)
        self.metrics.step(len(batch.decode_slots), batch.prompt_tokens, elapsed)
        self.metrics.traffic_step(batch, self.scheduler.busy)
        self.metrics.occupancy.observe(len(batch.decode_slots) / len(self.scheduler.slots))
        self.steps.append(StepRecord.of(plan, elapsed))
        self._sample(plan, forward.logits)

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> None:
        """A token for each decoding request and each request whose prompt the step finished."""
        sampled = [*plan.decoding]
        rows = list(range(len(plan.decoding)))
        for i, seq in enumerate(plan.prompting):
            if plan.finishes_prompt(i):
                self.scheduler.prompt_done(seq)
                self.metrics.prefill_time.observe(time.perf_counter() - seq.scheduled_at)
                self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
                sampled.append(seq)
                rows.append(len(plan.decoding) + i)
        if sampled:
            tokens = sample_tokens(sampled, logits[rows], self.fused_sampling)
            for seq, token in zip(sampled, tokens, strict=True):
                self._append(seq, token)

    def _ran(self, forward: Forward, started: float) -> float:
        elapsed = time.perf_counter() - started
        self.metrics.forward_time(elapsed)
        for use in forward.uses:
            self.metrics.bucket_usage(use.graph, use.real, use.padded)
        return elapsed

    def _append(self, seq: Sequence, token: int) -> None:
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        produced = len(seq.output_ids)
        reason = seq.append(token, self.runner.graphs.max_seq_len)
        self.metrics.generation_tokens.inc(len(seq.output_ids) - produced)
        if reason is not None:
            self.scheduler.release(seq)
            self._finished(seq)

    def _finished(self, seq: Sequence) -> None:
        self.metrics.running.set(self.scheduler.busy)
        self.metrics.finished.labels(self.metrics.model_name, seq.finish_reason).inc()
        now = time.perf_counter()
        self.metrics.e2e.observe(now - seq.arrival)
        self.metrics.traffic["request_generation_tokens"].observe(len(seq.output_ids))
        if seq.first_token_at is not None:
            self.metrics.decode_time.observe(now - seq.first_token_at)

    def _fail_all(self, message: str) -> None:
        for seq in self.scheduler.running():
            seq.finish("error", error=message)
            self.scheduler.release(seq)
            self._finished(seq)
