"""The graph set of a recipe: which static-shape step graphs exist, and which one runs a step.

Every backend runs an engine step (``model/step.py``: decode rows, packed prompt tokens, a KV length)
through the step graph, each dimension rounded up to a bucket by `step_shape`. The cpu backend
compiles one graph with dynamic shapes that covers every bucket (`step_bounds`). A compiler without
dynamic shapes (neuronx-cc) builds each shape as its own graph, so a ``static`` graph set keeps the
product small (`compiled_shapes`): decode-only steps per (batch bucket, KV bucket), as NxD Inference's
token-generation models, and steps with prompts at the full batch per (context bucket, KV bucket),
its context-encoding models with the running streams' decode tokens alongside.

Each choice also says how many of the graph's token slots were real, so the padding statistics are
counted where the bucket is chosen (`GraphUse`).
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

from neuron_serve.model.step import PromptChunk, StepBatch, StepShape
from neuron_serve.recipe.schema import ShapesSection

STEP = "step"
MAX_PROMPTS_PER_STEP = 8  # each prompt of a step costs one lm_head row, wasted in steps that finish none


@dataclass(frozen=True)
class GraphUse:
    """One graph call: `real` of its `padded` token slots held real tokens (decode: busy slots)."""

    graph: str
    real: int
    padded: int


@dataclass(frozen=True)
class GraphSet:
    batch_size: int
    max_seq_len: int
    context_buckets: tuple[int, ...]  # prompt tokens of one graph call
    token_buckets: tuple[int, ...]  # KV lengths attention reads
    batch_buckets: tuple[int, ...] = ()  # decode rows of a step; () = powers of two up to batch_size
    token_budget: int = 0  # tokens of one step, decode and prompt; 0 = batch_size + the largest context bucket
    static: bool = False  # each shape its own graph (`compiled_shapes`), not one dynamic-shape graph

    def __post_init__(self):
        if not self.batch_buckets:
            object.__setattr__(self, "batch_buckets", power_of_two_buckets(self.batch_size, 1))
        if not self.token_budget:
            object.__setattr__(self, "token_budget", self.batch_size + self.context_buckets[-1])

    @classmethod
    def from_shapes(cls, shapes: ShapesSection, static: bool = False) -> GraphSet:
        context, token = tuple(sorted(shapes.context_buckets)), tuple(sorted(shapes.token_buckets))
        batch = tuple(sorted(shapes.batch_buckets))
        return cls(shapes.batch_size, shapes.max_seq_len, context, token, batch, shapes.token_budget, static)

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
        one pad row (its context-encoding graph). In a static set a step with prompts takes every
        decode row and prompt row (`compiled_shapes`)."""
        rows = _bucket(self.batch_buckets, max(batch.decode_slots, default=0) + 1)
        prompt_tokens = _bucket(self.context_buckets, batch.prompt_tokens) if batch.chunks else 1
        prompts = _bucket(power_of_two_buckets(self.max_prompts, 1), max(1, len(batch.chunks)))
        if self.static and batch.chunks:
            rows, prompts = self.batch_size, self.max_prompts
        kv_len = _bucket(self.token_buckets, max(batch.kv_length, 1))
        shape = StepShape(rows, prompt_tokens, prompts, kv_len)
        uses = []
        if batch.decode_slots:
            uses.append(GraphUse(f"{STEP}_decode_{rows}x{kv_len}", len(batch.decode_slots), rows))
        if batch.chunks:
            uses.append(GraphUse(f"{STEP}_prompt_{prompt_tokens}", batch.prompt_tokens, prompt_tokens))
        return shape, uses

    def exact_decode_shape(self, batch: StepBatch, shape: StepShape) -> StepShape:
        """`shape` for a graph whose decode rows read exactly their own cached positions (the CPU's
        decode attention, `LlamaModel.exact_decode_keys`): its KV bucket need only hold the continued
        prompt's cached tokens. `shape`'s own bucket still names the step's use of the target's graphs."""
        cached = batch.continued.start if batch.continued else 0
        return dataclasses.replace(shape, kv_len=_bucket(self.token_buckets, max(cached, 1)))

    def compiled_shapes(self) -> list[StepShape]:
        """A static graph set's graphs: decode-only steps (one pad prompt token) per batch and KV
        bucket, then steps with prompts, at the full batch and every prompt row, per context and KV
        bucket. A dynamic set compiles one graph that covers all of them (`step_bounds`)."""
        return self._decode_shapes() + self._prompt_shapes()

    def _decode_shapes(self) -> list[StepShape]:
        return [StepShape(rows, 1, 1, kv) for kv in self.token_buckets for rows in self.batch_buckets]

    def _prompt_shapes(self) -> list[StepShape]:
        return [
            StepShape(self.batch_size, tokens, self.max_prompts, kv)
            for kv in self.token_buckets
            for tokens in self.context_buckets
        ]

    def warm_up_batches(self, every_graph: bool) -> list[StepBatch]:
        """Steps that run each compiled shape once (`every_graph`, as NxD Inference warms up every
        graph before serving), or else one prompt step and one decode step. Their tokens are pads:
        the cache positions they write are rewritten before anything reads them."""
        if not every_graph:
            prompt = StepBatch(chunks=[PromptChunk(0, 0, [0] * self.context_buckets[0])])
            return [prompt, StepBatch([0], [0], [self.token_buckets[0] - 1])]
        batches = [StepBatch([s.decode_rows - 1], [0], [s.kv_len - 1]) for s in self._decode_shapes()]
        for s in self._prompt_shapes():
            batches.append(
                StepBatch([s.decode_rows - 1], [0], [s.kv_len - 1], [PromptChunk(0, 0, [0] * s.prompt_tokens)])
            )
        return batches


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
