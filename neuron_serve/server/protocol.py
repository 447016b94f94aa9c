"""Request bodies (OpenAI, vLLM extras, TGI/LMI `parameters`) -> prompt tokens and SamplingParams.

A field we do not implement but that would change the output is rejected with a 400 that names it;
fields that change nothing (user, metadata, ...) and unknown extras are accepted, as vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neuron_serve.engine.sampler import SamplingParams, brief


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class Limits:
    max_seq_len: int
    vocab_size: int
    max_tokens_default: int
    longest_token: int  # characters of the model's longest token (its vocabulary's longest string)
    max_tokens_cap: int = 0  # the recipe's per-request cap; 0: none but the context

    @property
    def max_prompt_chars(self) -> int:
        """No text longer than this fits in max_seq_len tokens (`server/inputs.py`)."""
        return self.max_seq_len * self.longest_token


# Fields that would change the output and that this server does not implement, with the values that
# mean "off" (sent by many clients as defaults). null is always "off": OpenAI reads it as the default.
UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "suffix": ("",),
    "min_tokens": (0,),
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "structured_outputs": (),
    "min_p": (0, 0.0),
    "typical_p": (1, 1.0),
    "bad_words": ([],),
    "allowed_token_ids": (),
    "use_beam_search": (False,),
    "continue_final_message": (False,),
    "chat_template": (),
}
# TGI's `parameters` of the same kind (/invocations).
TGI_UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "truncate": (),
    "typical_p": (1, 1.0),
    "watermark": (False,),
    "best_of": (1,),
    "top_n_tokens": (0,),
    "grammar": (),
    "decoder_input_details": (False,),
}


def _is_off(value: Any, off: tuple[Any, ...]) -> bool:
    """Whether `value` is one of the "off" values, type and all (JSON's true is not 1)."""
    return value is None or any(type(value) is type(o) and value == o for o in off)


def reject_unsupported(
    body: dict[str, Any], unsupported: dict[str, tuple[Any, ...]] = UNSUPPORTED_UNLESS, where: str = ""
) -> None:
    """A 400 for the first field that asks for what this server does not do; `where` prefixes its name."""
    for name, off in unsupported.items():
        if name in body and not _is_off(body[name], off):
            only = f" (only {', '.join(map(repr, off))} or null)" if off else ""
            message = f"'{where}{name}' = {brief(body[name])} is not supported by this server{only}"
            raise APIError(400, message, f"{where}{name}")


def _typed(body: dict, name: str, kind: type | tuple, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise APIError(400, f"'{name}' must be a number, got {value!r}", name)
    if not isinstance(value, kind):
        raise APIError(400, f"'{name}' has the wrong type: {brief(value)}", name)
    return value


def _token_ids(body: dict, name: str) -> tuple[int, ...]:
    ids = _typed(body, name, list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise APIError(400, f"'{name}' must be a list of token ids (integers), got {brief(ids)}", name)
    return tuple(ids)


def _top_k(body: dict[str, Any]) -> int:
    """0 or -1 (vLLM's "off") for no top-k, else the count."""
    top_k = _typed(body, "top_k", int, 0)
    if top_k < -1:
        raise APIError(400, f"'top_k' must be -1 or 0 (off), or a count of tokens, got {top_k}", "top_k")
    return max(0, top_k)


def stream_settings(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage), checked before the request is queued."""
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    include_usage = _typed(options, "include_usage", bool, False)
    return stream, include_usage


def _stop_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise APIError(400, f"'stop' must be a string or a list of strings, got {brief(value)}", "stop")


def sampling_params(body: dict[str, Any], prompt_len: int, limits: Limits, max_tokens_field: str) -> SamplingParams:
    """OpenAI-style fields (plus vLLM's top_k, repetition_penalty, ignore_eos, stop_token_ids)."""
    room = limits.max_seq_len - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens; this model's maximum context length is {limits.max_seq_len} tokens "
            "and at least one must be left to generate",
            "prompt" if max_tokens_field == "max_tokens" else "messages",
        )
    max_tokens = _typed(body, max_tokens_field, int, None)
    if max_tokens is None and max_tokens_field == "max_completion_tokens":
        max_tokens = _typed(body, "max_tokens", int, None)
    if max_tokens is not None and limits.max_tokens_cap and max_tokens > limits.max_tokens_cap:
        raise APIError(
            400,
            f"{max_tokens_field} ({max_tokens}) is over this server's cap of {limits.max_tokens_cap}",
            max_tokens_field,
        )
    if max_tokens is not None and prompt_len + max_tokens > limits.max_seq_len:
        raise APIError(
            400,
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {prompt_len + max_tokens} exceeds this "
            f"model's maximum context length of {limits.max_seq_len} tokens",
            max_tokens_field,
        )
    params = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else min(limits.max_tokens_default, room),
        temperature=float(_typed(body, "temperature", (int, float), 1.0)),
        top_p=float(_typed(body, "top_p", (int, float), 1.0)),
        top_k=_top_k(body),
        seed=_typed(body, "seed", int, None),
        stop=_stop_list(body.get("stop")),
        stop_token_ids=_token_ids(body, "stop_token_ids"),
        ignore_eos=bool(_typed(body, "ignore_eos", bool, False)),
        repetition_penalty=float(_typed(body, "repetition_penalty", (int, float), 1.0)),
        presence_penalty=float(_typed(body, "presence_penalty", (int, float), 0.0)),
        frequency_penalty=float(_typed(body, "frequency_penalty", (int, float), 0.0)),
    )
    try:
        params.validate(limits.vocab_size)
    except ValueError as error:
        raise APIError(400, str(error), str(error).split(":")[0]) from None
    return params


def tgi_flags(parameters: dict[str, Any]) -> tuple[bool, bool]:
    """(details, return_full_text) of TGI `parameters`: booleans, not any truthy value."""
    flags = []
    for name in ("details", "return_full_text"):
        value = parameters.get(name)
        if value is not None and not isinstance(value, bool):
            raise APIError(400, f"'parameters.{name}' must be true or false, got {brief(value)}", f"parameters.{name}")
        flags.append(bool(value))
    return flags[0], flags[1]


def tgi_to_openai(parameters: dict[str, Any]) -> dict[str, Any]:
    """TGI / LMI `parameters` -> the OpenAI-style fields above."""
    known = {
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "do_sample",
        "repetition_penalty",
        "stop",
        "seed",
        "details",
        "return_full_text",
        "frequency_penalty",
        "presence_penalty",
        "ignore_eos",
        "stop_token_ids",
    }
    reject_unsupported(parameters, TGI_UNSUPPORTED_UNLESS, "parameters.")
    out = {k: v for k, v in parameters.items() if k in known}
    out["max_tokens"] = parameters.get("max_new_tokens")
    if not _typed(parameters, "do_sample", bool, False) and "temperature" not in parameters:
        out["temperature"] = 0.0  # TGI samples only with do_sample=true
    return out
