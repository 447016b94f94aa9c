"""Single-prompt generation on a runner: the `neuron-serve generate` command's loop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from neuron_serve.detokenizer import IncrementalDetokenizer
from neuron_serve.runner import Runner
from neuron_serve.sampler import SamplingParams, apply_penalties, new_generator, sample_row


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    first_token_s: float = 0.0
    total_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decode_s = self.total_s - self.first_token_s
        return (self.output_tokens - 1) / decode_s if self.output_tokens > 1 and decode_s > 0 else 0.0


def chat_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The model's chat template applied, ready for the assistant's turn (transformers returns a
    BatchEncoding or a plain list depending on its version)."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat: bool) -> list[int]:
    if chat:
        return chat_token_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer.encode(text, add_special_tokens=False)


def stop_ids(tokenizer: PreTrainedTokenizerBase, eos_token_ids: tuple[int, ...]) -> set[int]:
    ids = set(eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def generate(
    runner: Runner,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: set[int],
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Yields text pieces as tokens are made; slot 0 of the runner is used."""
    stats = stats or GenerationStats()
    stats.prompt_tokens = len(prompt_ids)
    max_tokens = min(params.max_tokens, runner.max_seq_len - len(prompt_ids))
    generator = new_generator(params.seed)
    detok = IncrementalDetokenizer(tokenizer)
    output: list[int] = []
    started = time.perf_counter()
    logits = runner.prefill(prompt_ids, slot=0)
    for step in range(max_tokens):
        apply_penalties(logits, params, prompt_ids, output)
        token = sample_row(logits, params, generator)
        if step == 0:
            stats.first_token_s = time.perf_counter() - started
        if token in eos_ids and not params.ignore_eos:
            break
        output.append(token)
        stats.output_tokens = len(output)
        piece = detok.add(token)
        if piece:
            yield piece
        if step + 1 < max_tokens:
            logits = runner.decode([token], [len(prompt_ids) + step])[0]
    stats.total_s = time.perf_counter() - started
    rest = detok.flush()
    if rest:
        yield rest
