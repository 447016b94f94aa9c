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
  tokens each prompt token attends: its own prompt's, causally. A pad token sees itself only. It is
  made from O(P + L) integers (`visible_keys`): each token's segment (its prompt) and how many cached
  positions it sees, and the L cache positions; a graph on a device makes it there from them.
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
    def kv_length(self) -> int:
        """Cache positions the step attends: every decode position's predecessors and the continued
        prompt's cached tokens (0 for a step of fresh prompts only)."""
        continued = self.continued
        return max([p + 1 for p in self.decode_positions] + [continued.start if continued else 0])

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


def decode_tensors(batch: StepBatch, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode tokens and positions [rows]: slot s's in row s, a pad token at position 0 in the others."""
    tokens, positions = torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
    tokens[batch.decode_slots] = torch.tensor(batch.decode_tokens, dtype=torch.long)
    positions[batch.decode_slots] = torch.tensor(batch.decode_positions, dtype=torch.long)
    return tokens, positions


def compact_step_tensors(batch: StepBatch, shape: StepShape) -> tuple[torch.Tensor, ...]:
    """The step's inputs before the cache, with `visible` left to `visible_keys`: decode tokens and
    positions [S], prompt tokens and positions [P], the cached row's slot [1], each prompt token's
    segment [P] (a pad's is its own) and cached positions seen [P], the cache positions [L], and the
    prompt tokens whose logits are wanted [R] (each chunk's last)."""
    p = shape.prompt_tokens
    decode_tokens, decode_positions = decode_tensors(batch, shape.decode_rows)
    tokens, positions = torch.zeros(p, dtype=torch.long), torch.zeros(p, dtype=torch.long)
    segments, cache_lens = -1 - torch.arange(p), torch.zeros(p, dtype=torch.long)
    last = torch.zeros(shape.prompts, dtype=torch.long)
    offset = 0
    for i, chunk in enumerate(batch.chunks):
        n, end = len(chunk.tokens), offset + len(chunk.tokens)
        tokens[offset:end] = torch.tensor(chunk.tokens, dtype=torch.long)
        positions[offset:end] = torch.arange(chunk.start, chunk.start + n)
        segments[offset:end], cache_lens[offset:end] = i, chunk.start  # only the continued chunk has start > 0
        last[i] = end - 1
        offset = end
    continued = batch.continued
    cached_slot = torch.tensor([continued.slot if continued else 0], dtype=torch.long)
    key_positions = torch.arange(shape.kv_len)
    return decode_tokens, decode_positions, tokens, positions, cached_slot, segments, cache_lens, key_positions, last


def visible_keys(segments: torch.Tensor, cache_lens: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """visible [P, L + P]: prompt token i sees the cached positions below cache_lens[i], and the step's
    tokens of its own segment up to itself."""
    order = torch.arange(segments.shape[0], device=segments.device)
    cached = key_positions.unsqueeze(0) < cache_lens.unsqueeze(1)
    own = (segments.unsqueeze(0) == segments.unsqueeze(1)) & (order.unsqueeze(0) <= order.unsqueeze(1))
    return torch.cat([cached, own], dim=1)


def step_tensors(batch: StepBatch, shape: StepShape) -> tuple[torch.Tensor, ...]:
    """The step graph's inputs before the cache (`compact_step_tensors` with `visible` made): decode
    tokens and positions [S], prompt tokens and positions [P], the cached row's slot [1], `visible`
    [P, L + P] and the prompt tokens whose logits are wanted [R]."""
    *head, segments, cache_lens, key_positions, last = compact_step_tensors(batch, shape)
    return (*head, visible_keys(segments, cache_lens, key_positions), last)


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
    return (
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(slots, dtype=torch.long),
        torch.tensor(positions, dtype=torch.long),
    )


def step_writes(batch: StepBatch, shape: StepShape, scratch_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, positions) [S + P]: where each of the step's new keys and values goes in a cache that
    the graph writes itself (`KVCache.written`). A pad row (a slot not decoding, a pad prompt token)
    goes to position 0 of `scratch_slot`, a row no sequence owns: a pad decode row of a slot that is
    still prefilling must not overwrite that slot's prompt."""
    rows, slots, positions = step_kept(batch, shape)
    write_slots = torch.full((shape.decode_rows + shape.prompt_tokens,), scratch_slot, dtype=torch.long)
    write_positions = torch.zeros_like(write_slots)
    write_slots[rows], write_positions[rows] = slots, positions
    return write_slots, write_positions


def logit_rows(batch: StepBatch, shape: StepShape) -> list[int]:
    """The rows of the step's logits [S + R, vocab] for each decode slot, then each chunk."""
    return list(batch.decode_slots) + [shape.decode_rows + i for i in range(len(batch.chunks))]
