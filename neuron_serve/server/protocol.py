"""Request bodies (OpenAI, vLLM extras, TGI/LMI `parameters`) -> prompt tokens and SamplingParams.

A field we do not implement but that would change the output is rejected with a 400 that names it;
fields that change nothing (user, metadata, ...) and unknown extras are accepted, as vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neuron_serve.engine.sampler import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class Limits:
    max_seq_len: int
    vocab_size: int
    max_tokens_default: int


# Fields that would change the output and that this server does not implement, with the value that
# means "off" (sent by many clients as a default).
UNSUPPORTED_UNLESS = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "top_logprobs": None,
    "logit_bias": None,
    "suffix": None,
    "min_tokens": 0,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
}
OFF_VALUES = {
    "logprobs": (None, False, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
}


def reject_unsupported(body: dict[str, Any]) -> None:
    for name, off in UNSUPPORTED_UNLESS.items():
        if name not in body:
            continue
        value = body[name]
        allowed = OFF_VALUES.get(name, (off,))
        if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
            continue
        if value not in allowed:
            raise APIError(400, f"'{name}' = {value!r} is not supported by this server (only {allowed[0]!r})", name)


def _typed(body: dict, name: str, kind: type | tuple, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise APIError(400, f"'{name}' must be a number, got {value!r}", name)
    if not isinstance(value, kind):
        raise APIError(400, f"'{name}' has the wrong type: {value!r}", name)
    return value


def _stop_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise APIError(400, "'stop' must be a string or a list of strings", "stop")


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
        top_k=max(0, _typed(body, "top_k", int, 0)),  # vLLM sends -1 for "off"
        seed=_typed(body, "seed", int, None),
        stop=_stop_list(body.get("stop")),
        stop_token_ids=tuple(_typed(body, "stop_token_ids", list, [])),
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
        "decoder_input_details",
        "watermark",
        "truncate",
        "typical_p",
        "frequency_penalty",
        "presence_penalty",
        "ignore_eos",
        "stop_token_ids",
    }
    for name in ("truncate", "typical_p", "watermark"):
        if parameters.get(name) not in (None, False, 1.0):
            raise APIError(400, f"parameter '{name}' is not supported by this server", f"parameters.{name}")
    out = {k: v for k, v in parameters.items() if k in known}
    out["max_tokens"] = parameters.get("max_new_tokens")
    if not parameters.get("do_sample", False) and "temperature" not in parameters:
        out["temperature"] = 0.0  # TGI samples only with do_sample=true
    return out
