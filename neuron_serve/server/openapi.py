"""The OpenAPI 3.0 document of every route, served at ``/openapi.json``.

It describes what the server accepts and answers, not all that OpenAI's API has: the fields it
implements with their limits (``protocol.py`` and ``engine/sampler.py`` own the limits; this document
restates them for clients), the error object of every 4xx, and the statuses each route can return.
Unknown extra fields are allowed, as vLLM allows them. The test suite fuzzes the live server against
this document (tests/test_openapi_fuzz.py), so a route that drifts from it fails there.
"""

from __future__ import annotations

from typing import Any

from neuron_serve.engine.sampler import MAX_STOP_STRINGS, REPETITION_PENALTY_RANGE, SEED_RANGE

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "integer"},
            },
        }
    },
}
_ERROR_STATUSES = {
    "400": "a field is missing, of the wrong type or out of its range; the message names it and the limit",
    "401": "no API key, or a wrong one (when the server has keys)",
    "403": "the tenant may not use this model",
    "404": "the model is not served here",
    "413": "the body is over 4 MB",
    "429": "the queue is full, or the tenant is over a limit: retry after Retry-After seconds",
    "503": "the model is loading or failed, or the server is shutting down",
}
_NUMBER = {"type": "number"}
_STOP = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_STRINGS},
    ],
    "nullable": True,
}
_SAMPLING = {
    "temperature": {**_NUMBER, "minimum": 0, "maximum": 2, "nullable": True},
    "top_p": {**_NUMBER, "exclusiveMinimum": True, "minimum": 0, "maximum": 1, "nullable": True},
    "top_k": {"type": "integer", "minimum": -1, "nullable": True},
    "seed": {"type": "integer", "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1], "nullable": True},
    "stop": _STOP,
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}, "nullable": True},
    "ignore_eos": {"type": "boolean", "nullable": True},
    "repetition_penalty": {
        **_NUMBER,
        "minimum": REPETITION_PENALTY_RANGE[0],
        "maximum": REPETITION_PENALTY_RANGE[1],
        "nullable": True,
    },
    "presence_penalty": {**_NUMBER, "minimum": -2, "maximum": 2, "nullable": True},
    "frequency_penalty": {**_NUMBER, "minimum": -2, "maximum": 2, "nullable": True},
    "stream": {"type": "boolean", "nullable": True},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean", "nullable": True}},
        "nullable": True,
    },
}
_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
}
_TEXT = {"type": "string", "minLength": 1}
# One server-sent event (its `data` line: a JSON chunk, or "[DONE]").
_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_TOKEN_IDS = {**_IDS, "minItems": 1}
# One prompt: text or token ids, either of them alone or as a list of one (OpenAI's batch form).
_PROMPT = {
    "oneOf": [
        _TEXT,
        _TOKEN_IDS,
        {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1},
    ]
}


def _completion_request(model_names: list[str], max_tokens_field: str, prompt_field: dict) -> dict:
    return {
        "type": "object",
        "required": ["model", *prompt_field],
        "properties": {
            "model": {"type": "string", "enum": model_names},
            **prompt_field,
            max_tokens_field: {"type": "integer", "minimum": 1, "nullable": True},
            **_SAMPLING,
        },
    }


def _responses(ok: dict, statuses: tuple[str, ...] = tuple(_ERROR_STATUSES)) -> dict:
    errors = {"content": {"application/json": {"schema": _ERROR}}}
    return {"200": ok, **{s: {"description": _ERROR_STATUSES[s], **errors} for s in statuses}}


def _json_or_stream(schema: dict, description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}, "text/event-stream": {"schema": _EVENT}},
    }


def _post(summary: str, request: dict, ok: dict) -> dict:
    body = {"required": True, "content": {"application/json": {"schema": request}}}
    return {"post": {"summary": summary, "requestBody": body, "responses": _responses(ok)}}


def _get(summary: str, ok: dict, statuses: tuple[str, ...]) -> dict:
    return {"get": {"summary": summary, "responses": _responses(ok, statuses)}}


def _health(summary: str, body: dict | None) -> dict:
    """/ping and /health answer 503 with their own body, not the error object, while not ready."""
    content = {"content": {"application/json": {"schema": body}}} if body else {}
    ok, not_ready = {"description": "ready", **content}, {"description": "loading or failed", **content}
    return {"get": {"summary": summary, "responses": {"200": ok, "503": not_ready}}}


def _choices(item: dict) -> dict:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": item},
            "usage": _USAGE,
        },
    }


def openapi_document(model_names: list[str]) -> dict[str, Any]:
    """The document for a server that serves `model_names`."""
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string"},
            "content": {
                "oneOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "text"],
                            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
                        },
                    },
                ],
                "nullable": True,
            },
        },
    }
    messages = {"messages": {"type": "array", "items": message, "minItems": 1}}
    prompt = {"prompt": _PROMPT}
    text_choice = {"type": "object", "properties": {"text": {"type": "string"}, "finish_reason": {"type": "string"}}}
    chat_choice = {"type": "object", "properties": {"message": {"type": "object"}, "finish_reason": {"type": "string"}}}
    tgi = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "inputs": _TEXT,
            "parameters": {
                "type": "object",
                "properties": {
                    "max_new_tokens": {"type": "integer", "minimum": 1, "nullable": True},
                    "do_sample": {"type": "boolean", "nullable": True},
                    "return_full_text": {"type": "boolean", "nullable": True},
                    "details": {"type": "boolean", "nullable": True},
                    **{k: v for k, v in _SAMPLING.items() if k not in ("stream", "stream_options")},
                },
                "nullable": True,
            },
        },
    }
    generated = {"type": "object", "required": ["generated_text"], "properties": {"generated_text": {"type": "string"}}}
    ok_json = {"description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}
    models = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {"type": "object"}}},
    }
    tokens = {"type": "object", "required": ["count", "tokens"], "properties": {"tokens": {"type": "array"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "neuron-serve", "version": "1", "description": f"Serving {', '.join(model_names)}."},
        "paths": {
            "/v1/completions": _post(
                "A completion (OpenAI)",
                _completion_request(model_names, "max_tokens", prompt),
                _json_or_stream(_choices(text_choice), "the completion, or its events (stream)"),
            ),
            "/v1/chat/completions": _post(
                "A chat completion (OpenAI)",
                _completion_request(model_names, "max_completion_tokens", messages),
                _json_or_stream(_choices(chat_choice), "the completion, or its events (stream)"),
            ),
            "/invocations": _post(
                "SageMaker: TGI/LMI inputs and parameters",
                tgi,
                _json_or_stream(generated, "the generated text, or its token events (Accept: text/event-stream)"),
            ),
            "/tokenize": _post(
                "Token ids of a text (vLLM)",
                {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"description": "ok", "content": {"application/json": {"schema": tokens}}},
            ),
            "/detokenize": _post(
                "The text of token ids (vLLM)",
                {"type": "object", "required": ["tokens"], "properties": {"tokens": _IDS}},
                ok_json,
            ),
            "/v1/models": _get(
                "The served models",
                {"description": "ok", "content": {"application/json": {"schema": models}}},
                ("401",),
            ),
            "/ping": _health("SageMaker's health check", None),
            "/health": _health(
                "Readiness, with the reason when not ready",
                {"type": "object", "required": ["status", "model"], "properties": {"status": {"type": "string"}}},
            ),
            "/metrics": _get(
                "Prometheus metrics",
                {"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}},
                ("401",),
            ),
        },
    }
