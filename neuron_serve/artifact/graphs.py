"""The graph set of a recipe: which static-shape graphs exist, their names, and which one runs a call.

Two families, both static-shape, chosen here once:

- the **step** graph (``model/step.py``): decode rows, packed prompt tokens and a KV length per call,
  each rounded up to a bucket by `step_shape`. The cpu backend runs every step through it;
- the **prefill / prefill_chunk / decode** graphs (`specs`, `prompt_pieces`, `decode_graph`): a prompt
  from position 0 per context bucket, its continuation, and a full-batch decode per KV bucket, as NxD
  Inference's context-encoding and token-generation models; the neuron backend compiles these.

Each choice also says how many of the graph's token slots were real, so the padding statistics are
counted where the bucket is chosen (`GraphUse`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from neuron_serve.model.step import StepBatch, StepShape
from neuron_serve.recipe.schema import ShapesSection

PREFILL, PREFILL_CHUNK, DECODE, STEP = "prefill", "prefill_chunk", "decode", "step"
MAX_PROMPTS_PER_STEP = 8  # each prompt of a step costs one lm_head row, wasted in steps that finish none


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
    context_buckets: tuple[int, ...]  # prompt tokens of one graph call
    token_buckets: tuple[int, ...]  # KV lengths attention reads
    batch_buckets: tuple[int, ...] = ()  # decode rows of a step; () = powers of two up to batch_size
    token_budget: int = 0  # tokens of one step, decode and prompt; 0 = batch_size + the largest context bucket

    def __post_init__(self):
        if not self.batch_buckets:
            object.__setattr__(self, "batch_buckets", power_of_two_buckets(self.batch_size, 1))
        if not self.token_budget:
            object.__setattr__(self, "token_budget", self.batch_size + self.context_buckets[-1])

    @classmethod
    def from_shapes(cls, shapes: ShapesSection) -> GraphSet:
        context, token = tuple(sorted(shapes.context_buckets)), tuple(sorted(shapes.token_buckets))
        batch = tuple(sorted(shapes.batch_buckets))
        return cls(shapes.batch_size, shapes.max_seq_len, context, token, batch, shapes.token_budget)

    @property
    def max_prompts(self) -> int:
        return min(self.batch_size, MAX_PROMPTS_PER_STEP)

    def check_prompt(self, prompt: list[int]) -> None:
        if not 0 < len(prompt) < self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens: must be 1 to {self.max_seq_len - 1} tokens")

    def prompt_budget(self, decoding: int) -> int:
        """Prompt tokens a step can take beside `decoding` decode tokens: the largest context bucket
        that fits in what the budget leaves, so that a long queue fills its bucket without padding."""
        fits = [b for b in self.context_buckets if b <= self.token_budget - decoding]
        return fits[-1] if fits else 0

    def step_bounds(self) -> StepShape:
        """The largest step shape: what a dynamic-shape compile of the step graph must cover."""
        return StepShape(self.batch_size, self.context_buckets[-1], self.max_prompts, self.max_seq_len)

    def step_shape(self, batch: StepBatch) -> tuple[StepShape, list[GraphUse]]:
        """The bucket of each of the step's dimensions: decode rows up to the highest decoding slot,
        prompt tokens, prompts (a power of two: each is an lm_head row), and the KV length that holds every
        decode position and the continued prompt's cached tokens. A step without prompts runs one
        pad token in their place (NxD Inference's token-generation graph), a step without decodes
        one pad row (its context-encoding graph)."""
        rows = _bucket(self.batch_buckets, max(batch.decode_slots, default=0) + 1)
        prompt_tokens = _bucket(self.context_buckets, batch.prompt_tokens) if batch.chunks else 1
        prompts = _bucket(power_of_two_buckets(self.max_prompts, 1), max(1, len(batch.chunks)))
        continued = batch.continued
        needed = max([p + 1 for p in batch.decode_positions] + [continued.start if continued else 1])
        kv_len = _bucket(self.token_buckets, needed)
        shape = StepShape(rows, prompt_tokens, prompts, kv_len)
        uses = []
        if batch.decode_slots:
            uses.append(GraphUse(f"{STEP}_decode_{rows}x{kv_len}", len(batch.decode_slots), rows))
        if batch.chunks:
            uses.append(GraphUse(f"{STEP}_prompt_{prompt_tokens}", batch.prompt_tokens, prompt_tokens))
        return shape, uses

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

    def prompt_pieces(self, tokens: list[int], start: int = 0) -> list[PromptPiece]:
        """Prompt tokens for positions start.. as graph calls: from position 0, the smallest context
        bucket that holds the prompt's start; after it, chunks of the largest bucket."""
        if start == 0:
            self.check_prompt(tokens)
        elif start + len(tokens) >= self.max_seq_len:
            raise ValueError(f"prompt of {start + len(tokens)} tokens: must be 1 to {self.max_seq_len - 1} tokens")
        largest = self.context_buckets[-1]
        pieces = []
        if start == 0:
            first = tokens[:largest]
            bucket = self.context_buckets[bisect.bisect_left(self.context_buckets, len(first))]
            pieces.append(PromptPiece(GraphSpec(PREFILL, bucket), 0, first))
        for offset in range(len(pieces[0].tokens) if pieces else 0, len(tokens), largest):
            pieces.append(PromptPiece(self.chunk, start + offset, tokens[offset : offset + largest]))
        return pieces

    def decode_graph(self, positions: list[int], active: int) -> tuple[GraphSpec, GraphUse]:
        """The smallest KV bucket that holds every slot's position; `active` of the slots are busy."""
        longest = max(positions) + 1
        spec = GraphSpec(DECODE, self.token_buckets[bisect.bisect_left(self.token_buckets, longest)])
        return spec, GraphUse(spec.name, active, self.batch_size)


def _bucket(buckets: tuple[int, ...], size: int) -> int:
    index = bisect.bisect_left(buckets, size)
    if index == len(buckets):
        raise ValueError(f"{size} is past the largest bucket ({buckets[-1]})")
    return buckets[index]


def power_of_two_buckets(largest: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `largest` (which is always the last)."""
    buckets, size = [], smallest
    while size < largest:
        buckets.append(size)
        size *= 2
    return (*buckets, largest)
