"""Prompts as token ids: the model's chat template, and the tokens that end a generation."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neuron_serve.engine.tokenizer import TextTokenizer


def chat_token_ids(tokenizer: TextTokenizer, messages: list[dict]) -> list[int]:
    """The model's chat template applied, ready for the assistant's turn (transformers returns a
    BatchEncoding or a plain list depending on its version)."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def encode_prompt(tokenizer: TextTokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        return chat_token_ids(tokenizer, [{"role": "user", "content": text}])
    return tokenizer.encode(text, add_special_tokens=False)


def stop_ids(tokenizer: TextTokenizer, eos_token_ids: tuple[int, ...]) -> frozenset[int]:
    ids = set(eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
