"""Which requests run: the waiting queue, the slots, and what each engine step does with them.

Pure policy, as nano-vllm's scheduler: no threads, no clocks, no metrics, no model. The engine asks
it what to run and tells it what finished. Today's policy is continuous batching over the compiled
slots: waiting requests take free slots in arrival order (one prefill each), then every busy slot
decodes one token; a finished or cancelled request frees its slot at once.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from neuron_serve.engine.sequence import Sequence


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the client should retry later."""


@dataclass
class DecodeBatch:
    """One decode step over every slot: the busy ones carry their last token at its position."""

    sequences: list[Sequence]  # the busy slots' requests, in slot order
    tokens: list[int]  # per slot; idle slots: 0
    positions: list[int]  # per slot; idle slots: 0


class Scheduler:
    def __init__(self, slots: int, max_waiting: int):
        self.slots: list[Sequence | None] = [None] * slots
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.max_waiting = max_waiting

    @property
    def busy(self) -> int:
        return sum(s is not None for s in self.slots)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.busy > 0

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
        self.waiting.append(seq)

    def admit(self) -> tuple[list[Sequence], list[Sequence]]:
        """(admitted, cancelled): waiting requests placed in free slots, in arrival order, and those
        cancelled while they waited (dropped)."""
        admitted, cancelled = [], []
        free = [i for i, s in enumerate(self.slots) if s is None]
        while free and self.waiting:
            seq = self.waiting.popleft()
            if seq.cancelled.is_set():
                cancelled.append(seq)
                continue
            seq.slot = free.pop(0)
            self.slots[seq.slot] = seq
            admitted.append(seq)
        return admitted, cancelled

    def take_cancelled(self) -> list[Sequence]:
        """Running requests whose client left; their slots are free from now on."""
        cancelled = [s for s in self.slots if s is not None and s.cancelled.is_set()]
        for seq in cancelled:
            self.release(seq)
        return cancelled

    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    def decode_batch(self) -> DecodeBatch | None:
        sequences = self.running()
        if not sequences:
            return None
        tokens = [s.output_ids[-1] if s else 0 for s in self.slots]
        positions = [s.position if s else 0 for s in self.slots]
        return DecodeBatch(sequences, tokens, positions)

    def release(self, seq: Sequence) -> None:
        self.slots[seq.slot] = None
