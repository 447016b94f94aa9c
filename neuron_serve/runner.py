"""Runs the model's static-shape graphs: picks the bucket, pads, chunks long prompts.

A runner owns the KV cache of `batch_size` slots. `EagerRunner` calls the PyTorch model directly;
the compiled runners (``aot.py``, ``tp.py``) call per-bucket graphs with the same signatures, and
this base class is all the bucket logic there is.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

import torch

from neuron_serve.model import LlamaModel, store_decode_kv, store_prompt_kv


@dataclass
class BucketUsage:
    """Real versus padded tokens per bucket, for the padding-ratio metric."""

    real: Counter = field(default_factory=Counter)
    padded: Counter = field(default_factory=Counter)

    def add(self, bucket: str, real: int, padded: int) -> None:
        self.real[bucket] += real
        self.padded[bucket] += padded


class Runner:
    def __init__(self, batch_size: int, max_seq_len: int, context_buckets: list[int], token_buckets: list[int]):
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.context_buckets = sorted(context_buckets)
        self.token_buckets = sorted(token_buckets)
        self.usage = BucketUsage()

    # Graph calls, one per kind, which subclasses implement; each returns (logits, keys, values)
    # as the model's forwards do.
    def run_prefill(self, bucket: int, tokens, last_index):
        raise NotImplementedError

    def run_prefill_chunk(self, tokens, start, last_index, slot: int):
        raise NotImplementedError

    def run_decode(self, kv_len: int, tokens, positions):
        raise NotImplementedError

    def store_prompt(self, slot: int, start: int, keys, values, count: int) -> None:
        store_prompt_kv(self.k_cache, self.v_cache, slot, start, keys, values, count)

    def store_decode(self, positions, keys, values) -> None:
        store_decode_kv(self.k_cache, self.v_cache, positions, keys, values)

    def prefill(self, prompt: list[int], slot: int) -> torch.Tensor:
        """Fill `slot` with the prompt; returns the logits [vocab] after its last token. A prompt
        longer than the largest context bucket goes through it in chunks."""
        if not 0 < len(prompt) < self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens: must be 1 to {self.max_seq_len - 1} tokens")
        largest = self.context_buckets[-1]
        first = prompt[:largest]
        bucket = self.context_buckets[bisect.bisect_left(self.context_buckets, len(first))]
        self.usage.add(f"prefill_{bucket}", len(first), bucket)
        logits, keys, values = self.run_prefill(bucket, _padded(first, bucket), torch.tensor([len(first) - 1]))
        self.store_prompt(slot, 0, keys, values, len(first))
        for start in range(largest, len(prompt), largest):
            chunk = prompt[start : start + largest]
            self.usage.add("prefill_chunk", len(chunk), largest)
            last = torch.tensor([len(chunk) - 1])
            logits, keys, values = self.run_prefill_chunk(_padded(chunk, largest), torch.tensor([start]), last, slot)
            self.store_prompt(slot, start, keys, values, len(chunk))
        return logits[0]

    def decode(self, tokens: list[int], positions: list[int], active: int | None = None) -> torch.Tensor:
        """One step for all slots. `tokens`/`positions` have one entry per slot (idle slots: any
        token at position 0). Returns logits [slots, vocab]."""
        longest = max(positions) + 1
        kv_len = self.token_buckets[bisect.bisect_left(self.token_buckets, longest)]
        busy = len(tokens) if active is None else active
        self.usage.add(f"decode_{kv_len}", busy, self.batch_size)
        positions_t = torch.tensor(positions)
        logits, keys, values = self.run_decode(kv_len, torch.tensor(tokens), positions_t)
        self.store_decode(positions_t, keys, values)
        return logits


def warm_up(runner: Runner, every_graph: bool) -> None:
    """Make the first requests' calls as fast as the later ones, then forget the warm-up in the
    padding statistics. On the CPU only the process's first forward pays a set-up cost (thread pools,
    allocator; AOTInductor graphs measured no first-call cost of their own), so one prefill and one
    decode do. On neuron every graph runs once (`every_graph`), as NxD Inference warms up before
    serving: a graph's first run on the device can carry set-up of its own."""
    prefill_lengths = list(runner.context_buckets) if every_graph else runner.context_buckets[:1]
    if every_graph and runner.context_buckets[-1] < runner.max_seq_len - 1:
        prefill_lengths.append(runner.context_buckets[-1] + 1)  # the chunk graph
    for length in prefill_lengths:
        runner.prefill([0] * length, slot=0)
    for kv_len in runner.token_buckets if every_graph else runner.token_buckets[:1]:
        runner.decode([0] * runner.batch_size, [kv_len - 1] + [0] * (runner.batch_size - 1))
    runner.usage.real.clear()
    runner.usage.padded.clear()


def _padded(tokens: list[int], length: int) -> torch.Tensor:
    out = torch.zeros(1, length, dtype=torch.long)
    out[0, : len(tokens)] = torch.tensor(tokens)
    return out


class EagerRunner(Runner):
    """The PyTorch model called directly (no tracing)."""

    def __init__(self, model: LlamaModel, batch_size: int, context_buckets: list[int], token_buckets: list[int]):
        super().__init__(batch_size, model.max_seq_len, context_buckets, token_buckets)
        self.model = model
        self.k_cache, self.v_cache = model.new_kv_cache(batch_size)

    @torch.inference_mode()
    def run_prefill(self, bucket, tokens, last_index):
        return self.model.prefill(tokens, last_index)

    @torch.inference_mode()
    def run_prefill_chunk(self, tokens, start, last_index, slot):
        return self.model.prefill_chunk(tokens, start, last_index, self.k_cache[:, slot], self.v_cache[:, slot])

    @torch.inference_mode()
    def run_decode(self, kv_len, tokens, positions):
        return self.model.decode(tokens, positions, self.k_cache, self.v_cache, kv_len)


def default_buckets(max_seq_len: int, smallest: int = 64) -> list[int]:
    """Powers of two from `smallest` up to max_seq_len (which is always the last)."""
    buckets, size = [], smallest
    while size < max_seq_len:
        buckets.append(size)
        size *= 2
    return buckets + [max_seq_len]
