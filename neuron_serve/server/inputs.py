"""A request's prompt as token ids, refused before the tokenizer when it could never fit.

Tokenizing costs time and memory in proportion to the text (a 1 MB prompt took a worker 180 MB that
it never gave back), so a prompt is measured in characters first: no token of the model is longer
than `Limits.longest_token` characters, so a text longer than `max_seq_len` such tokens can never fit,
and the tokenizer never sees more than that. The text must also be valid Unicode: JSON can carry a
lone UTF-16 surrogate that no tokenizer can encode.
"""

from __future__ import annotations

from typing import Any

from neuron_serve.engine.prompts import chat_token_ids
from neuron_serve.server.protocol import APIError, Limits

# /tokenize counts the tokens of texts that need not fit a prompt (`neuron-serve bench` cuts its prompts
# from a corpus encoded 2,000 characters at a time): it takes up to this many characters, or a whole
# prompt's worth where that is more. 64 K characters tokenize in milliseconds.
TOKENIZE_MAX_CHARS = 65_536


def checked_text(text: str, limits: Limits, param: str, most: int = 0) -> str:
    """`text`, or a 400 that names why the tokenizer will not see it. `most`: a bound of the route's
    own in characters (default: the longest prompt that could fit the model's context)."""
    if len(text) > (most or limits.max_prompt_chars):
        why = (
            f"this route takes at most {most}"
            if most
            else f"this model's {limits.max_seq_len} tokens of at most {limits.longest_token} characters each "
            f"hold at most {limits.max_prompt_chars}"
        )
        raise APIError(400, f"'{param}' has {len(text)} characters; {why}", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        where = f"{error.object[error.start]!r} at character {error.start}"
        raise APIError(400, f"'{param}' is not valid Unicode: a lone surrogate {where}", param) from None
    return text


def _message_text(i: int, message: Any) -> tuple[str, str]:
    """(role, text) of `messages[i]`: a string content or a list of text parts."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
    content = message.get("content")
    if content is None:
        return message["role"], ""
    if isinstance(content, str):
        return message["role"], content
    if not isinstance(content, list):
        raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise APIError(400, f"messages[{i}].content[{j}]: only text content parts are supported", "messages")
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{i}].content[{j}].text must be a string", "messages")
        texts.append(part["text"])
    return message["role"], "".join(texts)


def chat_prompt(tokenizer: Any, limits: Limits, messages: Any) -> list[int]:
    """The conversation through the model's chat template."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    plain = [dict(zip(("role", "content"), _message_text(i, m), strict=True)) for i, m in enumerate(messages)]
    checked_text("".join(m["role"] + m["content"] for m in plain), limits, "messages")
    try:
        return chat_token_ids(tokenizer, plain)
    except Exception as error:  # the model's own template rejects the conversation
        raise APIError(400, f"the chat template rejected the messages: {error}", "messages") from None


def completion_prompt(tokenizer: Any, limits: Limits, prompt: Any) -> list[int]:
    """One prompt: a string, or token ids (either may come as a list of one)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return tokenizer.encode(checked_text(prompt, limits, "prompt"))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < limits.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {limits.vocab_size})", "prompt")
        return prompt
    raise APIError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)", "prompt")
