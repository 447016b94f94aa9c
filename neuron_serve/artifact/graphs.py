"""The graph set of a recipe: which static-shape graphs exist, their names, and which one runs a call.

Every backend compiles exactly `GraphSet.specs()` and every runner asks `prompt_pieces` and
`decode_graph` which graph runs, so the names, the bucket choice and whether a prompt can need a chunk
graph are decided here once. Each choice also says how many of the graph's token slots were real,
so the padding statistics are counted where the bucket is chosen (`GraphUse`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from neuron_serve.recipe.schema import ShapesSection

PREFILL, PREFILL_CHUNK, DECODE = "prefill", "prefill_chunk", "decode"


@dataclass(frozen=True)
class GraphSpec:
    kind: str  # PREFILL | PREFILL_CHUNK | DECODE
    bucket: int  # prompt length (prefill kinds) or KV length attended over (decode)

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.bucket}"


@dataclass(frozen=True)
class GraphUse:
    """One graph call: `real` of its `padded` token slots held real tokens (decode: busy slots)."""

    graph: str
    real: int
    padded: int


@dataclass(frozen=True)
class PromptPiece:
    """Part of a prompt and the graph that runs it: `tokens` go to positions start..start+len-1."""

    spec: GraphSpec
    start: int
    tokens: list[int]

    @property
    def use(self) -> GraphUse:
        return GraphUse(self.spec.name, len(self.tokens), self.spec.bucket)


@dataclass(frozen=True)
class GraphSet:
    batch_size: int
    max_seq_len: int
    context_buckets: tuple[int, ...]
    token_buckets: tuple[int, ...]

    @classmethod
    def from_shapes(cls, shapes: ShapesSection) -> GraphSet:
        context, token = tuple(sorted(shapes.context_buckets)), tuple(sorted(shapes.token_buckets))
        return cls(shapes.batch_size, shapes.max_seq_len, context, token)

    @property
    def chunk(self) -> GraphSpec | None:
        """The graph for the rest of a prompt longer than the largest context bucket, when one can be."""
        largest = self.context_buckets[-1]
        return GraphSpec(PREFILL_CHUNK, largest) if largest < self.max_seq_len - 1 else None

    def specs(self) -> list[GraphSpec]:
        prefills = [GraphSpec(PREFILL, b) for b in self.context_buckets]
        chunks = [self.chunk] if self.chunk else []
        return prefills + chunks + [GraphSpec(DECODE, b) for b in self.token_buckets]

    def warm_up_calls(self, every_graph: bool) -> tuple[list[int], list[int]]:
        """(prompt lengths, decode KV buckets) that run every graph once, or just the first of each."""
        if not every_graph:
            return [self.context_buckets[0]], [self.token_buckets[0]]
        chunked = [self.chunk.bucket + 1] if self.chunk else []  # one token past the largest bucket
        return [*self.context_buckets, *chunked], list(self.token_buckets)

    def prompt_pieces(self, prompt: list[int]) -> list[PromptPiece]:
        """The smallest context bucket that holds the prompt's start, then chunks of the largest."""
        if not 0 < len(prompt) < self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens: must be 1 to {self.max_seq_len - 1} tokens")
        largest = self.context_buckets[-1]
        first = prompt[:largest]
        bucket = self.context_buckets[bisect.bisect_left(self.context_buckets, len(first))]
        pieces = [PromptPiece(GraphSpec(PREFILL, bucket), 0, first)]
        for start in range(largest, len(prompt), largest):
            pieces.append(PromptPiece(self.chunk, start, prompt[start : start + largest]))
        return pieces

    def decode_graph(self, positions: list[int], active: int) -> tuple[GraphSpec, GraphUse]:
        """The smallest KV bucket that holds every slot's position; `active` of the slots are busy."""
        longest = max(positions) + 1
        spec = GraphSpec(DECODE, self.token_buckets[bisect.bisect_left(self.token_buckets, longest)])
        return spec, GraphUse(spec.name, active, self.batch_size)


def power_of_two_buckets(max_seq_len: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` up to max_seq_len (which is always the last)."""
    buckets, size = [], smallest
    while size < max_seq_len:
        buckets.append(size)
        size *= 2
    return (*buckets, max_seq_len)
