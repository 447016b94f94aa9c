"""The bucket logic every runner shares: a prompt in pieces, a decode step at its KV bucket.

`GraphSet` chooses the graph of each call; a subclass runs it (`run_prefill`, `run_prefill_chunk`,
`run_decode`, each returning logits and the keys and values the model made) and this class stores
those in the KV cache, which the graphs only read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from neuron_serve.artifact.graphs import GraphSet, GraphSpec
from neuron_serve.backends.base import Forward, Runner
from neuron_serve.model.kv_cache import KVCache

GraphOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # logits, keys, values


class BucketedRunner(ABC):
    graphs: GraphSet
    cache: KVCache

    @abstractmethod
    def run_prefill(self, spec: GraphSpec, tokens: torch.Tensor, last_index: torch.Tensor) -> GraphOutput: ...

    @abstractmethod
    def run_prefill_chunk(
        self, spec: GraphSpec, tokens: torch.Tensor, start: torch.Tensor, last_index: torch.Tensor, slot: int
    ) -> GraphOutput: ...

    @abstractmethod
    def run_decode(self, spec: GraphSpec, tokens: torch.Tensor, positions: torch.Tensor) -> GraphOutput: ...

    def prefill(self, prompt: list[int], slot: int) -> Forward:
        pieces = self.graphs.prompt_pieces(prompt)
        for piece in pieces:
            tokens, last = _padded(piece.tokens, piece.spec.bucket), torch.tensor([len(piece.tokens) - 1])
            if piece.start == 0:
                logits, keys, values = self.run_prefill(piece.spec, tokens, last)
            else:
                start = torch.tensor([piece.start])
                logits, keys, values = self.run_prefill_chunk(piece.spec, tokens, start, last, slot)
            self.cache.store_prompt(slot, piece.start, keys, values, len(piece.tokens))
        return Forward(logits[0], [piece.use for piece in pieces])

    def decode(self, tokens: list[int], positions: list[int], active: int) -> Forward:
        spec, use = self.graphs.decode_graph(positions, active)
        positions_t = torch.tensor(positions)
        logits, keys, values = self.run_decode(spec, torch.tensor(tokens), positions_t)
        self.cache.store_decode(positions_t, keys, values)
        return Forward(logits, [use])

    def close(self) -> None:  # noqa: B027 (a runner in one process has nothing to release)
        """Nothing to release: the cache and the graphs go with the process."""


def warm_up(runner: Runner, every_graph: bool) -> None:
    """Run the first calls, so that the first requests are as fast as the later ones. `every_graph`
    runs each graph once, as NxD Inference warms up before serving; otherwise one prefill and one
    decode, which is what the CPU needs (see `CpuBackend.warm_up`)."""
    prompt_lengths, kv_buckets = runner.graphs.warm_up_calls(every_graph)
    for length in prompt_lengths:
        runner.prefill([0] * length, slot=0)
    slots = runner.graphs.batch_size
    for kv_len in kv_buckets:
        runner.decode([0] * slots, [kv_len - 1] + [0] * (slots - 1), active=slots)


def _padded(tokens: list[int], length: int) -> torch.Tensor:
    out = torch.zeros(1, length, dtype=torch.long)
    out[0, : len(tokens)] = torch.tensor(tokens)
    return out
