"""The engine: one thread per model replica running continuous batching over the compiled slots.

Between decode steps, waiting requests take free slots (one prefill each); every decode step then
advances all busy slots by one token. A finished or cancelled request frees its slot at once.
Greedy rows take one batched argmax; the others are sampled per request, or all at once by the fused
sampling kernel when the artifact's recipe enables it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import torch

import nki_kernels
from neuron_serve.metrics import Metrics
from neuron_serve.runner import Runner
from neuron_serve.sampler import apply_penalties, sample_row
from neuron_serve.sequence import Sequence
from nki_kernels.tiles import MAX_CANDIDATES

log = logging.getLogger("neuron_serve.engine")


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the client should retry later."""


class Engine:
    def __init__(self, runner: Runner, metrics: Metrics, max_waiting: int, kernels: frozenset[str] = frozenset()):
        """`kernels`: the artifact recipe's enabled kernels; the engine uses "sampling"."""
        self.runner = runner
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.fused_sampling = "sampling" in kernels
        self.slots: list[Sequence | None] = [None] * runner.batch_size
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.condition = threading.Condition()
        self.stopped = False
        self._usage_reported: dict[str, tuple[int, int]] = {}
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
        with self.condition:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            self.waiting.append(seq)
            self.metrics.waiting.set(len(self.waiting))
            self.condition.notify()

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self.slots)

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.stopped and not self.waiting and not self.busy_slots:
                    self.metrics.idle()
                    self.condition.wait(timeout=1.0)
                if self.stopped:
                    return
                admitted = self._admit()
            try:
                for seq in admitted:
                    self._prefill(seq)
                self._drop_cancelled()
                if self.busy_slots:
                    self._decode_step()
            except Exception as error:  # a failed forward must not take the replica down
                log.exception("engine step failed")
                self._fail_all(f"internal error in the engine: {error}")
            self._report_bucket_usage()

    def _admit(self) -> list[Sequence]:
        admitted = []
        free = [i for i, s in enumerate(self.slots) if s is None]
        while free and self.waiting:
            seq = self.waiting.popleft()
            if seq.cancelled.is_set():
                seq.finish("cancelled")
                continue
            seq.slot = free.pop(0)
            seq.scheduled_at = time.perf_counter()
            self.slots[seq.slot] = seq
            admitted.append(seq)
        self.metrics.waiting.set(len(self.waiting))
        self.metrics.running.set(self.busy_slots)
        return admitted

    def _prefill(self, seq: Sequence) -> None:
        self.metrics.queue_time.observe(seq.scheduled_at - seq.arrival)
        started = time.perf_counter()
        logits = self.runner.prefill(seq.prompt_ids, seq.slot)
        elapsed = time.perf_counter() - started
        self.metrics.forward_time(elapsed)
        self.metrics.prefill_time.observe(elapsed)
        self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        self._append(seq, self._sample([seq], logits.unsqueeze(0))[0])

    def _decode_step(self) -> None:
        active = [s for s in self.slots if s is not None]
        tokens = [s.output_ids[-1] if s else 0 for s in self.slots]
        positions = [s.position if s else 0 for s in self.slots]
        started = time.perf_counter()
        logits = self.runner.decode(tokens, positions, active=len(active))
        self.metrics.forward_time(time.perf_counter() - started)
        self.metrics.occupancy.observe(len(active) / len(self.slots))
        sampled = self._sample(active, logits[[seq.slot for seq in active]])
        for seq, token in zip(active, sampled, strict=True):
            self._append(seq, token)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token per sequence from its row of `logits` [len(seqs), vocab]."""
        tokens = logits.argmax(dim=-1).tolist()
        rows = [i for i, seq in enumerate(seqs) if not seq.params.greedy or _penalised(seq)]
        if not rows:
            return tokens
        picked = [seqs[i] for i in rows]
        rows_logits = logits[rows]  # a copy (indexed by a list): the penalties change it in place
        for row, seq in zip(rows_logits, picked, strict=True):
            apply_penalties(row, seq.params, seq.prompt_ids, seq.output_ids)
        fused = [i for i, seq in enumerate(picked) if self.fused_sampling and _fused_is_exact(seq)]
        if fused:
            drawn = _sample_fused([picked[i] for i in fused], rows_logits[fused])
            for i, token in zip(fused, drawn, strict=True):
                tokens[rows[i]] = token
        for i, seq in enumerate(picked):
            if i not in fused:
                tokens[rows[i]] = sample_row(rows_logits[i], seq.params, seq.generator)
        return tokens

    def _append(self, seq: Sequence, token: int) -> None:
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        produced = len(seq.output_ids)
        reason = seq.append(token, self.runner.max_seq_len)
        self.metrics.generation_tokens.inc(len(seq.output_ids) - produced)
        if reason is not None:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.slots[seq.slot] = None
        self.metrics.running.set(self.busy_slots)
        self.metrics.finished.labels(self.metrics.model_name, seq.finish_reason).inc()
        now = time.perf_counter()
        self.metrics.e2e.observe(now - seq.arrival)
        if seq.first_token_at is not None:
            self.metrics.decode_time.observe(now - seq.first_token_at)

    def _drop_cancelled(self) -> None:
        for seq in self.slots:
            if seq is not None and seq.cancelled.is_set():
                seq.finish("cancelled")
                self._release(seq)

    def _fail_all(self, message: str) -> None:
        for seq in self.slots:
            if seq is not None:
                seq.finish("error", error=message)
                self._release(seq)

    def _report_bucket_usage(self) -> None:
        usage = self.runner.usage
        for bucket in usage.padded:
            real, padded = usage.real[bucket], usage.padded[bucket]
            last_real, last_padded = self._usage_reported.get(bucket, (0, 0))
            if padded != last_padded:
                self.metrics.bucket_usage(bucket, real - last_real, padded - last_padded)
                self._usage_reported[bucket] = (real, padded)


def _penalised(seq: Sequence) -> bool:
    params = seq.params
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty or params.frequency_penalty)


def _fused_is_exact(seq: Sequence) -> bool:
    """The kernel keeps at most MAX_CANDIDATES tokens after top-k/top-p (as NxD Inference's on-device
    sampling does); a request whose filter could keep more is sampled exactly, per row."""
    params = seq.params
    if params.top_p < 1.0:
        return 0 < params.top_k <= MAX_CANDIDATES
    return params.top_k <= MAX_CANDIDATES


def _sample_fused(seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
    """The sampling kernel over all rows at once. Each row's uniform comes from its own request's
    generator, one per token, so a seeded request draws the same numbers alone or batched."""
    params = [seq.params for seq in seqs]
    uniform = torch.cat([torch.rand(1, generator=seq.generator, dtype=torch.float64) for seq in seqs])
    ids = nki_kernels.sample(
        logits,
        torch.tensor([p.temperature for p in params]),
        torch.tensor([p.top_k for p in params]),
        torch.tensor([p.top_p for p in params], dtype=torch.float64),
        uniform,
    )
    return ids.tolist()
