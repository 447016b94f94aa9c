"""What one engine step computes, and the tensors its graph is called with.

A step is Sarathi-Serve's stall-free batch: one decode token for each running stream, and prompt
chunks of waiting requests in the rest of the token budget, all through the layers in one pass, so
the weights are read once per step however the tokens are split. Shapes are static per graph:

- decode rows are the slots ``0..S-1`` (S a batch bucket), each at its own position; a row whose slot
  is not decoding (free, or still prefilling) runs a pad token and nothing of it is kept;
- prompt tokens are packed, P of them (a prefill bucket), several prompts one after another;
- at most one prompt per step continues a prefill from an earlier step (the scheduler only ever cuts
  the last prompt of a step, and finishes it first in the next), so its earlier tokens are the one
  cache row that the prompt tokens read, up to the step's KV bucket L;
- `visible` [P, L + P] says which of those L cached positions and which of the step's own prompt
  tokens each prompt token attends: its own prompt's, causally. A pad token sees itself only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PromptChunk:
    """`tokens` of the prompt in `slot`, at positions start..start+len-1 (start > 0: a continuation)."""

    slot: int
    start: int
    tokens: list[int]


@dataclass
class StepBatch:
    """The work of one step: decode tokens (one per decoding slot) and prompt chunks."""

    decode_slots: list[int] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    chunks: list[PromptChunk] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)

    @property
    def continued(self) -> PromptChunk | None:
        """The chunk that continues a prompt begun in an earlier step, if any (at most one)."""
        return next((c for c in self.chunks if c.start > 0), None)


@dataclass(frozen=True)
class StepShape:
    """The static shape of a step's graph: S decode rows, P prompt tokens, R prompt logit rows and
    the KV length L that attention reads from the cache."""

    decode_rows: int
    prompt_tokens: int
    prompts: int
    kv_len: int


def step_tensors(batch: StepBatch, shape: StepShape) -> tuple[torch.Tensor, ...]:
    """The graph's inputs before the cache: decode tokens and positions [S], prompt tokens and
    positions [P], the cached row's slot [1], `visible` [P, L + P] and the prompt tokens whose logits
    are wanted [R] (each chunk's last)."""
    s, p, length = shape.decode_rows, shape.prompt_tokens, shape.kv_len
    decode_tokens, decode_positions = torch.zeros(s, dtype=torch.long), torch.zeros(s, dtype=torch.long)
    decode_tokens[batch.decode_slots] = torch.tensor(batch.decode_tokens, dtype=torch.long)
    decode_positions[batch.decode_slots] = torch.tensor(batch.decode_positions, dtype=torch.long)
    tokens, positions = torch.zeros(p, dtype=torch.long), torch.zeros(p, dtype=torch.long)
    visible = torch.zeros(p, length + p, dtype=torch.bool)
    visible[:, length:].fill_diagonal_(True)
    last = torch.zeros(shape.prompts, dtype=torch.long)
    offset = 0
    for i, chunk in enumerate(batch.chunks):
        n, end = len(chunk.tokens), offset + len(chunk.tokens)
        tokens[offset:end] = torch.tensor(chunk.tokens, dtype=torch.long)
        positions[offset:end] = torch.arange(chunk.start, chunk.start + n)
        visible[offset:end, length + offset : length + end] = torch.ones(n, n, dtype=torch.bool).tril()
        visible[offset:end, : chunk.start] = True  # only the continued chunk has start > 0
        last[i] = end - 1
        offset = end
    continued = batch.continued
    cached_slot = torch.tensor([continued.slot if continued else 0], dtype=torch.long)
    return decode_tokens, decode_positions, tokens, positions, cached_slot, visible, last


def step_kept(batch: StepBatch, shape: StepShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, slots, positions): which of the step's S + P new keys and values are real, and where
    in the cache each goes."""
    rows, slots, positions = list(batch.decode_slots), list(batch.decode_slots), list(batch.decode_positions)
    offset = shape.decode_rows
    for chunk in batch.chunks:
        n = len(chunk.tokens)
        rows += range(offset, offset + n)
        slots += [chunk.slot] * n
        positions += range(chunk.start, chunk.start + n)
        offset += n
    return torch.tensor(rows, dtype=torch.long), torch.tensor(slots, dtype=torch.long), torch.tensor(positions)


def logit_rows(batch: StepBatch, shape: StepShape) -> list[int]:
    """The rows of the step's logits [S + R, vocab] for each decode slot, then each chunk."""
    return list(batch.decode_slots) + [shape.decode_rows + i for i in range(len(batch.chunks))]
