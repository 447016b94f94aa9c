"""Workloads: presets by input:output token ratio, prompts cut from real text, or a user's JSONL file.

Synthetic prompts are slices of a public-domain English text (``data/corpus.txt``), re-tokenized with
the served model's tokenizer until they have exactly the asked-for length: real text makes the server
do the same work as real traffic (no degenerate repeated tokens), exact lengths make runs comparable.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from neuron_serve.bench.tokenizer import BenchError, BenchTokenizer

# Longest text sent to /tokenize at once: servers may refuse prompts longer than their context.
_ENCODE_CHUNK_CHARS = 2000
# Re-tokenizing a decoded slice can merge or split tokens at its edges; a few rounds always settle it.
_EXACT_LENGTH_ROUNDS = 6


@dataclass(frozen=True)
class Preset:
    name: str
    input_len: int
    output_len: int


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("qa", 256, 128),  # 2:1, a question with context, a short answer
        Preset("summarization", 1024, 128),  # 8:1, a long document, a short summary
        Preset("generation", 256, 256),  # 1:1, open-ended writing
    )
}


@dataclass
class WorkloadSpec:
    """What to send: a preset (or explicit lengths) and their spread, or a JSONL file of prompts."""

    preset: str = "qa"
    input_len: int | None = None
    output_len: int | None = None
    range_ratio: float = 0.0  # lengths are drawn uniformly from [len * (1 - r), len * (1 + r)]
    num_prompts: int = 100
    seed: int = 0
    dataset: Path | None = None

    def lengths(self) -> tuple[int, int]:
        """Mean input and output lengths: the preset's, or the ones given, the other one kept at the ratio."""
        preset = PRESETS[self.preset]
        ratio = preset.input_len / preset.output_len
        if self.input_len and self.output_len:
            return self.input_len, self.output_len
        if self.input_len:
            return self.input_len, max(1, round(self.input_len / ratio))
        if self.output_len:
            return max(1, round(self.output_len * ratio)), self.output_len
        return preset.input_len, preset.output_len


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int | None  # tokens the server will count, None when unknown (no tokenizer)
    max_tokens: int


def load_corpus() -> str:
    return (resources.files("neuron_serve.bench") / "data" / "corpus.txt").read_text(encoding="utf-8")


def corpus_token_ids(tok: BenchTokenizer, text: str) -> list[int]:
    """Token ids of the whole corpus, encoded paragraph groups at a time."""
    ids: list[int] = []
    chunk = ""
    for para in text.split("\n\n"):
        if chunk and len(chunk) + len(para) > _ENCODE_CHUNK_CHARS:
            ids += tok.encode(chunk)
            chunk = ""
        chunk += para + "\n\n"
    return ids + (tok.encode(chunk) if chunk else [])


def sample_lengths(mean: int, range_ratio: float, n: int, rng: np.random.Generator) -> list[int]:
    low = max(1, round(mean * (1 - range_ratio)))
    high = max(low, round(mean * (1 + range_ratio)))
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


def exact_length_text(tok: BenchTokenizer, source: list[int], target: int) -> tuple[str, int]:
    """Text that tokenizes to ``target`` tokens, cut from ``source`` (which holds spare tokens after it).

    Returns the text and its real length, which differs from ``target`` only if the rounds run out.
    """
    text = tok.decode(source[:target])
    spare = iter(source[target:])
    for _ in range(_EXACT_LENGTH_ROUNDS):
        ids = tok.encode(text)
        if len(ids) == target:
            return text, target
        if len(ids) > target:
            ids = ids[:target]
        else:
            ids = ids + list(itertools.islice(spare, target - len(ids)))
        text = tok.decode(ids)
    return text, len(tok.encode(text))


def synthetic_requests(
    spec: WorkloadSpec, tok: BenchTokenizer, corpus_ids: list[int], overhead: int, seed: int | Sequence[int]
) -> list[BenchRequest]:
    """``spec.num_prompts`` prompts cut at random places of the corpus, with exact token lengths.

    ``overhead`` is the number of tokens the server adds around each prompt (BOS, chat template): the
    slice is shortened by that much so that the server counts the asked-for length.
    """
    rng = np.random.default_rng(seed)
    mean_in, mean_out = spec.lengths()
    inputs = sample_lengths(mean_in, spec.range_ratio, spec.num_prompts, rng)
    outputs = sample_lengths(mean_out, spec.range_ratio, spec.num_prompts, rng)
    requests = []
    for n_in, n_out in zip(inputs, outputs, strict=True):
        target = max(1, n_in - overhead)
        # Repeat the corpus when a prompt is longer than it, and keep spare tokens for exact_length_text.
        need = target + 64
        ids = corpus_ids * (need // len(corpus_ids) + 2)
        start = int(rng.integers(0, len(corpus_ids)))
        text, got = exact_length_text(tok, ids[start : start + need], target)
        requests.append(BenchRequest(prompt=text, prompt_len=got + overhead, max_tokens=n_out))
    return requests


def load_jsonl(
    path: Path, default_output_len: int, limit: int, tok: BenchTokenizer | None, overhead: int
) -> list[BenchRequest]:
    """A user's prompts: one JSON object a line, ``{"prompt": "...", "output_len": N}`` (``max_tokens``
    is accepted for ``output_len``; both are optional)."""
    requests = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = str(row["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise BenchError(f"{path}:{lineno}: expected a JSON object with a 'prompt' ({exc})") from exc
            out = int(row.get("output_len") or row.get("max_tokens") or default_output_len)
            prompt_len = len(tok.encode(prompt)) + overhead if tok else None
            requests.append(BenchRequest(prompt=prompt, prompt_len=prompt_len, max_tokens=out))
            if len(requests) == limit:
                break
    if not requests:
        raise BenchError(f"{path} holds no prompts")
    return requests
