"""Per-request sampling over a batch of logits: penalties, temperature, top-k, top-p, seeds.

Every request draws its random numbers from its own generator, one per token, so a seeded request
gives the same tokens whether it runs alone or beside others. Greedy rows take one batched argmax;
the others are sampled per request, or all at once by the fused sampling kernel when the artifact's
recipe enables it and the kernel's result is exact for the request.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Protocol

import torch

import nki_kernels
from nki_kernels.tiles import MAX_CANDIDATES

# vLLM's rule: a temperature this low samples as greedy. Dividing logits by a smaller one overflows to
# inf, and a softmax of inf is nan: a request must not be able to make its batch's sampling fail.
GREEDY_BELOW_TEMPERATURE = 1e-5
# Repetition penalties divide or multiply logits: outside this range they overflow in the same way.
REPETITION_PENALTY_RANGE = (0.01, 10.0)
# Seeds a torch.Generator takes: a 64-bit value, signed or not.
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_STOP_STRINGS = 16


def _brief_repr() -> reprlib.Repr:
    """An error message names the value it refuses, shortened: echoing a 4 MB body back costs as much
    as receiving it. (Attributes, not keywords: Python 3.10 and 3.11's Repr takes none.)"""
    short = reprlib.Repr()
    short.maxstring = short.maxother = 60
    short.maxlist = short.maxtuple = short.maxdict = 4
    short.maxlevel = 2
    return short


brief = _brief_repr().repr


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self, vocab_size: int) -> None:
        """Raises ValueError naming the parameter and its allowed range."""
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0.0 <= self.temperature <= 2.0, "must be in [0, 2]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", 0 <= self.top_k <= vocab_size, f"must be in [0, {vocab_size}] (0 = off)"),
            (
                "repetition_penalty",
                REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1],
                f"must be in {list(REPETITION_PENALTY_RANGE)}",
            ),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            (
                "seed",
                self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
                f"must be in {list(SEED_RANGE)}",
            ),
            (
                "stop",
                len(self.stop) <= MAX_STOP_STRINGS and all(self.stop),
                f"at most {MAX_STOP_STRINGS} non-empty strings",
            ),
            (
                "stop_token_ids",
                all(0 <= t < vocab_size for t in self.stop_token_ids),
                f"ids in [0, {vocab_size})",
            ),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}: {rule}, got {brief(getattr(self, name))}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def new_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]):
    """In place on one row. Repetition penalty as in Hugging Face/vLLM (over prompt and output);
    presence and frequency penalties as in OpenAI's API (over the output only)."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        if len(seen):
            values = logits[seen]
            logits[seen] = torch.where(
                values > 0, values / params.repetition_penalty, values * params.repetition_penalty
            )
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        ids, counts = torch.tensor(output_ids, dtype=torch.long).unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(logits.dtype)


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from one row of (already penalised) logits."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the first token).
        outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        outside[0] = False  # a top_p that rounds to 0 in float32 (5e-324) would otherwise keep nothing
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class SamplingState(Protocol):
    """What sampling reads of a request (a `Sequence`)."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator


def sample_tokens(requests: list[SamplingState], logits: torch.Tensor, fused_sampling: bool) -> list[int]:
    """One token per request from its row of `logits` [len(requests), vocab]."""
    tokens = logits.argmax(dim=-1).tolist()
    rows = [i for i, request in enumerate(requests) if not request.params.greedy or _penalised(request.params)]
    if not rows:
        return tokens
    picked = [requests[i] for i in rows]
    rows_logits = logits[rows]  # a copy (indexed by a list): the penalties change it in place
    for row, request in zip(rows_logits, picked, strict=True):
        apply_penalties(row, request.params, request.prompt_ids, request.output_ids)
    fused = [i for i, request in enumerate(picked) if fused_sampling and fused_is_exact(request.params)]
    if fused:
        drawn = _sample_fused([picked[i] for i in fused], rows_logits[fused])
        for i, token in zip(fused, drawn, strict=True):
            tokens[rows[i]] = token
    for i, request in enumerate(picked):
        if i not in fused:
            tokens[rows[i]] = sample_row(rows_logits[i], request.params, request.generator)
    return tokens


def _penalised(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty or params.frequency_penalty)


def fused_is_exact(params: SamplingParams) -> bool:
    """The kernel keeps at most MAX_CANDIDATES tokens after top-k/top-p (as NxD Inference's on-device
    sampling does); a request whose filter could keep more is sampled exactly, per row."""
    if params.top_p < 1.0:
        return 0 < params.top_k <= MAX_CANDIDATES
    return params.top_k <= MAX_CANDIDATES


def _sample_fused(requests: list[SamplingState], logits: torch.Tensor) -> list[int]:
    """The sampling kernel over all rows at once. Each row's uniform comes from its own request's
    generator, one per token, so a seeded request draws the same numbers alone or batched."""
    params = [request.params for request in requests]
    uniform = torch.cat([torch.rand(1, generator=request.generator, dtype=torch.float64) for request in requests])
    ids = nki_kernels.sample(
        logits,
        torch.tensor([0.0 if p.greedy else p.temperature for p in params]),
        torch.tensor([p.top_k for p in params]),
        torch.tensor([p.top_p for p in params], dtype=torch.float64),
        uniform,
    )
    return ids.tolist()
