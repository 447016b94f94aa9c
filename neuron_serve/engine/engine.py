"""The engine: one thread per model replica that loops schedule, run, sample, emit.

The scheduler (``scheduler.py``) decides what each step runs, the runner (a forward process, or any
`backends.base.Runner`) runs it, the sampler picks the tokens, and each `Sequence` streams its text.
The engine itself only keeps time: metrics and each request's timestamps.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from neuron_serve.backends.base import Forward, Runner
from neuron_serve.engine.metrics import Metrics
from neuron_serve.engine.sampler import sample_tokens
from neuron_serve.engine.scheduler import DecodeBatch, Scheduler
from neuron_serve.engine.sequence import Sequence

log = logging.getLogger("neuron_serve.engine")


class Engine:
    def __init__(self, runner: Runner, metrics: Metrics, max_waiting: int, kernels: frozenset[str] = frozenset()):
        """`kernels`: the artifact recipe's enabled kernels; the engine uses "sampling"."""
        self.runner = runner
        self.metrics = metrics
        self.fused_sampling = "sampling" in kernels
        self.scheduler = Scheduler(runner.graphs.batch_size, max_waiting)
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
                admitted, cancelled = self.scheduler.admit()
                self._count_slots()
            scheduled_at = time.perf_counter()
            try:
                for seq in cancelled:
                    seq.finish("cancelled")
                for seq in admitted:
                    seq.scheduled_at = scheduled_at
                    self._prefill(seq)
                for seq in self.scheduler.take_cancelled():
                    seq.finish("cancelled")
                    self._finished(seq)
                batch = self.scheduler.decode_batch()
                if batch:
                    self._decode(batch)
            except Exception as error:  # a failed forward must not take the replica down
                log.exception("engine step failed")
                self._fail_all(f"internal error in the engine: {error}")

    def _count_slots(self) -> None:
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.running.set(self.scheduler.busy)

    def _prefill(self, seq: Sequence) -> None:
        self.metrics.queue_time.observe(seq.scheduled_at - seq.arrival)
        started = time.perf_counter()
        forward = self.runner.prefill(seq.prompt_ids, seq.slot)
        elapsed = self._ran(forward, started)
        self.metrics.prefill_time.observe(elapsed)
        self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        self._append(seq, sample_tokens([seq], forward.logits.unsqueeze(0), self.fused_sampling)[0])

    def _decode(self, batch: DecodeBatch) -> None:
        active = batch.sequences
        started = time.perf_counter()
        forward = self.runner.decode(batch.tokens, batch.positions, active=len(active))
        self._ran(forward, started)
        self.metrics.occupancy.observe(len(active) / len(self.scheduler.slots))
        logits: torch.Tensor = forward.logits[[seq.slot for seq in active]]
        for seq, token in zip(active, sample_tokens(active, logits, self.fused_sampling), strict=True):
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
        if seq.first_token_at is not None:
            self.metrics.decode_time.observe(now - seq.first_token_at)

    def _fail_all(self, message: str) -> None:
        for seq in self.scheduler.running():
            seq.finish("error", error=message)
            self.scheduler.release(seq)
            self._finished(seq)
