"""OpenAI-compatible routes (/v1/...), SageMaker's /invocations, and vLLM's /tokenize, /detokenize."""

from __future__ import annotations

import json
import time

from flask import Flask, Response, g, jsonify, request, stream_with_context

from neuron_serve.engine.sampler import brief
from neuron_serve.engine.sequence import Delta, Finished, Sequence
from neuron_serve.server.http import (
    SHUTTING_DOWN,
    events,
    json_body,
    log_request,
    new_id,
    served,
    sse,
    submit,
)
from neuron_serve.server.inputs import TOKENIZE_MAX_CHARS, chat_prompt, checked_text, completion_prompt
from neuron_serve.server.protocol import (
    APIError,
    reject_unsupported,
    sampling_params,
    stream_settings,
    tgi_flags,
    tgi_to_openai,
)
from neuron_serve.server.service import ModelService

CLIENT_CLOSED = 499  # nginx's status for a request whose client left before the answer


def usage(seq: Sequence) -> dict:
    n, m = len(seq.prompt_ids), len(seq.output_ids)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def openai_response(chat: bool, body: dict | None = None, route: str = ""):
    """An OpenAI completion or chat request; from /invocations (LMI's chat schema) the model is optional."""
    body = json_body() if body is None else body
    service = served().ready(body.get("model"), required=not route)
    reject_unsupported(body)
    stream, include_usage = stream_settings(body)
    tokenizer, limits = service.tokenizer, service.limits
    if chat:
        prompt_ids = chat_prompt(tokenizer, limits, body.get("messages"))
    else:
        prompt_ids = completion_prompt(tokenizer, limits, body.get("prompt"))
    field = "max_completion_tokens" if chat else "max_tokens"
    params = sampling_params(body, len(prompt_ids), limits, field)
    seq = submit(service, prompt_ids, params)
    shape = ChatShape(service) if chat else CompletionShape(service)
    route = route or ("/v1/chat/completions" if chat else "/v1/completions")
    if stream:
        return Response(
            stream_with_context(openai_stream(service, seq, shape, include_usage, route)),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    collected = collect(service, seq, route)
    if collected is None:
        return Response(status=CLIENT_CLOSED)
    text, finished = collected
    return jsonify(shape.full(text, finished.reason) | {"usage": usage(seq)})


def collect(service: ModelService, seq: Sequence, route: str) -> tuple[str, Finished] | None:
    """The whole output of a non-streaming request (None when the client left first)."""
    text, finished = [], None
    for event in events(seq):
        if isinstance(event, Delta):
            text.append(event.text)
        else:
            finished = event
    if finished is None:
        log_request(service, route, seq, None, CLIENT_CLOSED)
        return None
    status = (503 if finished.error == SHUTTING_DOWN else 500) if finished.error else 200
    log_request(service, route, seq, finished, status)
    if finished.error:
        raise APIError(status, finished.error, None, "server_error")
    return "".join(text), finished


def openai_stream(service, seq, shape, include_usage: bool, route: str):
    finished = None
    yield from shape.opening()
    for event in events(seq):
        if isinstance(event, Delta):
            if event.text:
                yield sse(shape.chunk({"text": event.text}, None))
        elif event.error:
            finished = event
            yield sse({"error": {"message": event.error, "type": "server_error", "param": None, "code": 500}})
        else:
            finished = event
            yield sse(shape.chunk({}, event.reason))
    if finished is None:
        log_request(service, route, seq, None, CLIENT_CLOSED)
        return
    if include_usage:
        yield sse(shape.envelope([]) | {"usage": usage(seq)})
    yield sse("[DONE]")
    log_request(service, route, seq, finished, 200)


class CompletionShape:
    object_name = "text_completion"

    def __init__(self, service: ModelService):
        self.id = new_id("chatcmpl" if isinstance(self, ChatShape) else "cmpl")
        self.model = service.settings.model_name
        self.created = int(time.time())

    def envelope(self, choices: list) -> dict:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def opening(self):
        return iter(())

    def chunk(self, delta: dict, reason: str | None) -> dict:
        choice = {"index": 0, "text": delta.get("text", ""), "logprobs": None, "finish_reason": reason}
        return self.envelope([choice])

    def full(self, text: str, reason: str) -> dict:
        return self.envelope([{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}])


class ChatShape(CompletionShape):
    object_name = "chat.completion.chunk"

    def opening(self):
        yield sse(self.envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))

    def chunk(self, delta: dict, reason: str | None) -> dict:
        content = {"content": delta["text"]} if "text" in delta else {}
        return self.envelope([{"index": 0, "delta": content, "logprobs": None, "finish_reason": reason}])

    def full(self, text: str, reason: str) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        return self.envelope([choice]) | {"object": "chat.completion"}


STREAM_TYPES = ("text/event-stream", "application/jsonlines")


def invocations():
    """SageMaker's TGI/LMI schema, {"inputs": "...", "parameters": {...}}, or LMI's chat schema,
    {"messages": [...], ...} (answered as an OpenAI chat completion). `model` is optional: the first
    model served answers a request that names none."""
    body = json_body()
    if "messages" in body and "inputs" not in body:
        return openai_response(chat=True, body=body, route="/invocations")
    service = served().ready(body.get("model"), required=False)
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise APIError(400, "'inputs' must be a non-empty string (or give 'messages', LMI's chat schema)", "inputs")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise APIError(400, "'parameters' must be an object", "parameters")
    stream = stream_settings(body)[0]
    details, full_text = tgi_flags(parameters)
    prefix = inputs if full_text else ""
    prompt_ids = service.tokenizer.encode(checked_text(inputs, service.limits, "inputs"))
    params = sampling_params(tgi_to_openai(parameters), len(prompt_ids), service.limits, "max_tokens")
    # The client's preference by quality (RFC 9110), not by substring: JSON unless it prefers a stream.
    accepted = request.accept_mimetypes.best_match(("application/json", *STREAM_TYPES), default="application/json")
    seq = submit(service, prompt_ids, params)
    if accepted in STREAM_TYPES or stream:
        sse_format = accepted == "text/event-stream"
        mimetype = "text/event-stream" if sse_format else "application/jsonlines"
        return Response(stream_with_context(invocation_stream(service, seq, sse_format, prefix)), mimetype=mimetype)
    collected = collect(service, seq, "/invocations")
    if collected is None:
        return Response(status=CLIENT_CLOSED)
    text, finished = collected
    result = {"generated_text": prefix + text}
    if details:
        result["details"] = {
            "finish_reason": finished.reason,
            "generated_tokens": len(seq.output_ids),
            "prompt_tokens": len(seq.prompt_ids),
            "seed": seq.params.seed,
        }
    return jsonify(result)


def _tgi_token(delta: Delta | None) -> dict:
    """TGI's token object; a stream that ended before any text ends with an empty special token."""
    if delta is None:
        return {"id": None, "text": "", "logprob": None, "special": True}
    token_id = delta.token_ids[0] if delta.token_ids else None
    return {"id": token_id, "text": delta.text, "logprob": None, "special": False}


def invocation_stream(service: ModelService, seq: Sequence, sse_format: bool, prefix: str):
    """TGI's SSE token events, or LMI's JSON lines. As TGI does, each event is one token and the last
    one carries the whole text too, so each event waits for the next token (or the end)."""
    text, held = [], None
    for event in events(seq):
        if isinstance(event, Delta):
            if held is not None:
                yield _frame({"token": _tgi_token(held), "generated_text": None, "details": None}, sse_format)
            text.append(event.text)
            held = event
            continue
        if event.error:
            payload = {"error": event.error, "error_type": "server_error"}
        else:
            details = {"finish_reason": event.reason, "generated_tokens": event.completion_tokens}
            payload = {"token": _tgi_token(held), "generated_text": prefix + "".join(text), "details": details}
        yield _frame(payload, sse_format)
        log_request(service, "/invocations", seq, event, 200)
        return
    log_request(service, "/invocations", seq, None, CLIENT_CLOSED)


def _frame(payload: dict, sse_format: bool) -> str:
    return sse(payload) if sse_format else json.dumps(payload, ensure_ascii=False) + "\n"


def register_routes(app: Flask) -> None:
    @app.post("/v1/completions")
    def completions():
        return openai_response(chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions():
        return openai_response(chat=True)

    @app.post("/invocations")
    def sagemaker_invocations():
        return invocations()

    @app.get("/v1/models")
    def models():
        tenant = g.get("tenant")
        visible = [s for s in served().services if tenant is None or tenant.may_use(s.settings.model_name)]
        return jsonify({"object": "list", "data": [model_card(service) for service in visible]})

    @app.post("/tokenize")
    def tokenize():
        body = json_body()
        live = served().ready(body.get("model"))
        if "messages" in body:
            tokens = chat_prompt(live.tokenizer, live.limits, body["messages"])
        elif isinstance(body.get("prompt"), str):
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise APIError(
                    400, f"'add_special_tokens' must be true or false, got {brief(special)}", "add_special_tokens"
                )
            most = max(TOKENIZE_MAX_CHARS, live.limits.max_prompt_chars)
            text = checked_text(body["prompt"], live.limits, "prompt", most)
            tokens = live.tokenizer.encode(text, add_special_tokens=special)
        else:
            raise APIError(400, "give 'prompt' (a string) or 'messages'", "prompt")
        return jsonify({"count": len(tokens), "max_model_len": live.limits.max_seq_len, "tokens": tokens})

    @app.post("/detokenize")
    def detokenize():
        body = json_body()
        live = served().ready(body.get("model"))
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < live.limits.vocab_size for t in tokens
        ):
            raise APIError(400, f"'tokens' must be a list of ids in [0, {live.limits.vocab_size})", "tokens")
        return jsonify({"prompt": live.tokenizer.decode(tokens)})


def model_card(service: ModelService) -> dict:
    return {
        "id": service.settings.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "neuron-serve",
        "root": service.source or service.settings.model_name,
        "max_model_len": service.limits.max_seq_len if service.limits else None,
    }
