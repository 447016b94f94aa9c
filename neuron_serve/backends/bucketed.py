"""A step on the prefill / prefill_chunk / decode graph family (``artifact/graphs.py``).

The family NxD Inference compiles: a prompt from position 0 per context bucket, its continuation
in chunks of the largest, and a full-batch decode per KV bucket. A step runs each prompt chunk on
the first two and the decode slots on the third; a subclass runs each graph (`run_prefill`,
`run_prefill_chunk`, `run_decode`, each returning logits and the keys and values the model made)
and this class stores what is kept in the KV cache, which the graphs only read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from neuron_serve.artifact.graphs import GraphSet, GraphSpec, GraphUse
from neuron_serve.backends.base import Forward, Runner, run_decode, run_prompt
from neuron_serve.model.kv_cache import KVCache
from neuron_serve.model.step import PromptChunk, StepBatch

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

    def step(self, batch: StepBatch) -> Forward:
        uses: list[GraphUse] = []
        rows = [self._prompt_chunk(chunk, uses) for chunk in batch.chunks]
        if batch.decode_slots:
            rows = [self._decode(batch, uses), *rows]
        return Forward(torch.cat(rows), uses)

    def _prompt_chunk(self, chunk: PromptChunk, uses: list[GraphUse]) -> torch.Tensor:
        for piece in self.graphs.prompt_pieces(chunk.tokens, chunk.start):
            tokens, last = _padded(piece.tokens, piece.spec.bucket), torch.tensor([len(piece.tokens) - 1])
            if piece.start == 0:
                logits, keys, values = self.run_prefill(piece.spec, tokens, last)
            else:
                start = torch.tensor([piece.start])
                logits, keys, values = self.run_prefill_chunk(piece.spec, tokens, start, last, chunk.slot)
            self.cache.store_prompt(chunk.slot, piece.start, keys, values, len(piece.tokens))
            uses.append(piece.use)
        return logits

    def _decode(self, batch: StepBatch, uses: list[GraphUse]) -> torch.Tensor:
        """Every slot runs (the graph's batch is all of them); only the decoding ones are kept."""
        tokens = torch.zeros(self.graphs.batch_size, dtype=torch.long)
        positions = torch.zeros(self.graphs.batch_size, dtype=torch.long)
        slots = torch.tensor(batch.decode_slots)
        tokens[slots], positions[slots] = torch.tensor(batch.decode_tokens), torch.tensor(batch.decode_positions)
        spec, use = self.graphs.decode_graph(positions.tolist(), len(batch.decode_slots))
        logits, keys, values = self.run_decode(spec, tokens, positions)
        self.cache.store(slots, positions[slots], keys[:, slots, 0], values[:, slots, 0])
        uses.append(use)
        return logits[slots]

    def close(self) -> None:  # noqa: B027 (a runner in one process has nothing to release)
        """Nothing to release: the cache and the graphs go with the process."""


def warm_up(runner: Runner, every_graph: bool) -> None:
    """Run the first calls, so that the first requests are as fast as the later ones. `every_graph`
    runs each graph once, as NxD Inference warms up before serving; otherwise one prompt and one
    decode, which is what the CPU needs (see `CpuBackend.warm_up`)."""
    prompt_lengths, kv_buckets = runner.graphs.warm_up_calls(every_graph)
    for length in prompt_lengths:
        run_prompt(runner, [0] * length, slot=0)
    for kv_len in kv_buckets:
        run_decode(runner, [0], [0], [kv_len - 1])


def _padded(tokens: list[int], length: int) -> torch.Tensor:
    out = torch.zeros(1, length, dtype=torch.long)
    out[0, : len(tokens)] = torch.tensor(tokens)
    return out
