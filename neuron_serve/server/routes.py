"""OpenAI-compatible routes (/v1/...), SageMaker's /invocations, and vLLM's /tokenize, /detokenize."""

from __future__ import annotations

import json
import time

from flask import Flask, Response, jsonify, request, stream_with_context

from neuron_serve.engine.prompts import chat_token_ids
from neuron_serve.engine.sequence import Delta, Finished, Sequence
from neuron_serve.server.http import events, json_body, log_request, new_id, ready_service, sse, submit
from neuron_serve.server.protocol import APIError, reject_unsupported, sampling_params, tgi_to_openai
from neuron_serve.server.service import ModelService


def chat_prompt(service: ModelService, messages) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role'", "messages")
        content = message.get("content") or ""
        if isinstance(content, list):
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(p.get("text", "") for p in content)
        plain.append({"role": message["role"], "content": content})
    try:
        return chat_token_ids(service.tokenizer, plain)
    except Exception as error:  # the model's own template rejects the conversation
        raise APIError(400, f"the chat template rejected the messages: {error}", "messages") from None


def completion_prompt(service: ModelService, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return service.tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < service.limits.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {service.limits.vocab_size})", "prompt")
        return prompt
    raise APIError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)", "prompt")


def usage(seq: Sequence) -> dict:
    n, m = len(seq.prompt_ids), len(seq.output_ids)
    return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def openai_response(service: ModelService, chat: bool):
    body = json_body()
    reject_unsupported(body)
    prompt_ids = chat_prompt(service, body.get("messages")) if chat else completion_prompt(service, body.get("prompt"))
    field = "max_completion_tokens" if chat else "max_tokens"
    params = sampling_params(body, len(prompt_ids), service.limits, field)
    seq = submit(service, prompt_ids, params)
    shape = ChatShape(service) if chat else CompletionShape(service)
    route = "/v1/chat/completions" if chat else "/v1/completions"
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return Response(
            stream_with_context(openai_stream(service, seq, shape, include_usage, route)),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    collected = collect(service, seq, route)
    if collected is None:
        return Response(status=499)
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
        return None
    log_request(service, route, seq, finished, 500 if finished.error else 200)
    if finished.error:
        raise APIError(500, finished.error, None, "server_error")
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


def invocations(service: ModelService):
    """SageMaker's TGI/LMI schema: {"inputs": "...", "parameters": {...}}."""
    body = json_body()
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise APIError(400, "'inputs' must be a non-empty string", "inputs")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise APIError(400, "'parameters' must be an object", "parameters")
    prompt_ids = service.tokenizer.encode(inputs)
    params = sampling_params(tgi_to_openai(parameters), len(prompt_ids), service.limits, "max_tokens")
    seq = submit(service, prompt_ids, params)
    accept = request.headers.get("Accept", "")
    prefix = inputs if parameters.get("return_full_text") else ""
    if "text/event-stream" in accept or "jsonlines" in accept or body.get("stream"):
        sse_format = "text/event-stream" in accept
        mimetype = "text/event-stream" if sse_format else "application/jsonlines"
        return Response(stream_with_context(invocation_stream(service, seq, sse_format, prefix)), mimetype=mimetype)
    collected = collect(service, seq, "/invocations")
    if collected is None:
        return Response(status=499)
    text, finished = collected
    result = {"generated_text": prefix + text}
    if parameters.get("details"):
        result["details"] = {
            "finish_reason": finished.reason,
            "generated_tokens": len(seq.output_ids),
            "prompt_tokens": len(seq.prompt_ids),
            "seed": seq.params.seed,
        }
    return jsonify(result)


def invocation_stream(service: ModelService, seq: Sequence, sse_format: bool, prefix: str):
    """TGI's SSE token events, or LMI's JSON lines; the last event carries the whole text."""
    text = []
    for event in events(seq):
        if isinstance(event, Delta):
            text.append(event.text)
            token_id = event.token_ids[0] if event.token_ids else None
            payload = {
                "token": {"id": token_id, "text": event.text, "logprob": None, "special": False},
                "generated_text": None,
                "details": None,
            }
        elif event.error:
            payload = {"error": event.error, "error_type": "server_error"}
        else:
            details = {"finish_reason": event.reason, "generated_tokens": event.completion_tokens}
            payload = {"token": None, "generated_text": prefix + "".join(text), "details": details}
        yield sse(payload) if sse_format else json.dumps(payload, ensure_ascii=False) + "\n"
        if isinstance(event, Finished):
            log_request(service, "/invocations", seq, event, 200)


def register_routes(app: Flask, service: ModelService) -> None:
    @app.post("/v1/completions")
    def completions():
        return openai_response(ready_service(), chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions():
        return openai_response(ready_service(), chat=True)

    @app.post("/invocations")
    def sagemaker_invocations():
        return invocations(ready_service())

    @app.get("/v1/models")
    def models():
        model = {
            "id": service.settings.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "neuron-serve",
            "root": service.source or service.settings.model_name,
            "max_model_len": service.limits.max_seq_len if service.limits else None,
        }
        return jsonify({"object": "list", "data": [model]})

    @app.post("/tokenize")
    def tokenize():
        live = ready_service()
        body = json_body()
        if "messages" in body:
            tokens = chat_prompt(live, body["messages"])
        elif isinstance(body.get("prompt"), str):
            tokens = live.tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
        else:
            raise APIError(400, "give 'prompt' (a string) or 'messages'", "prompt")
        return jsonify({"count": len(tokens), "max_model_len": live.limits.max_seq_len, "tokens": tokens})

    @app.post("/detokenize")
    def detokenize():
        live = ready_service()
        tokens = json_body().get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and 0 <= t < live.limits.vocab_size for t in tokens
        ):
            raise APIError(400, f"'tokens' must be a list of ids in [0, {live.limits.vocab_size})", "tokens")
        return jsonify({"prompt": live.tokenizer.decode(tokens)})
