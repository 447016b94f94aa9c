"""What every route does around a request: the served models, the JSON body, queueing, the stream of
events (with disconnect detection), SSE framing and the request log."""

from __future__ import annotations

import json
import logging
import select
import socket
import time
import uuid
from collections.abc import Iterator
from queue import Empty

from flask import current_app, g, request

from neuron_serve.engine.sampler import brief
from neuron_serve.engine.scheduler import QueueFullError
from neuron_serve.engine.sequence import Delta, Finished, Sequence
from neuron_serve.server.models import ServedModels
from neuron_serve.server.protocol import APIError
from neuron_serve.server.service import ModelService
from neuron_serve.server.worker import draining_past_deadline

request_log = logging.getLogger("neuron_serve.requests")


def served() -> ServedModels:
    return current_app.extensions["models"]


def json_body() -> dict:
    """The body as a JSON object, whatever its Content-Type says (as vLLM reads it)."""
    limit = served().default.settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise APIError(413, f"the request body has {request.content_length} bytes; the limit is {limit} bytes")
    raw = request.get_data()  # a chunked body: cut off one byte past the limit (`create_app`)
    if len(raw) > limit:
        raise APIError(413, f"the request body is over the limit of {limit} bytes")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: it nests too deeply") from None
    except ValueError as error:
        raise APIError(400, f"the request body is not valid JSON: {brief(str(error))}") from None
    if not isinstance(body, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(body), "a number")
        raise APIError(400, f"the request body must be a JSON object, got {kind}")
    return body


def submit(service: ModelService, prompt_ids: list[int], params) -> Sequence:
    tenant = g.get("tenant")
    seq = Sequence(prompt_ids, params, service.tokenizer, service.eos_ids)
    if tenant is not None:
        seq.tenant, seq.weight = tenant.name, tenant.weight
    try:
        service.engine.submit(seq)
    except QueueFullError as error:
        raise APIError(429, f"{error}; retry later", None, "rate_limit_exceeded") from None
    return seq


def client_gone() -> bool:
    """True once the client closed its connection (gunicorn hands us the socket)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (OSError, ValueError):
        return True


SHUTTING_DOWN = "the server is shutting down and its drain time is up; retry the request elsewhere"


def events(seq: Sequence) -> Iterator[Delta | Finished]:
    """The sequence's events as they come; cancels it when the client goes away, and ends it with an
    error when the worker's drain is about to run out (`worker.draining_past_deadline`)."""
    try:
        while True:
            if draining_past_deadline():
                seq.cancelled.set()
                yield Finished("error", len(seq.prompt_ids), len(seq.output_ids), SHUTTING_DOWN)
                return
            try:
                event = seq.events.get(timeout=0.02)
            except Empty:
                if client_gone():
                    seq.cancelled.set()
                    return
                continue
            yield event
            if isinstance(event, Finished):
                return
    finally:
        if seq.finish_reason is None:
            seq.cancelled.set()  # the client left mid-stream (the WSGI server closed this generator)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def log_request(service: ModelService, route: str, seq: Sequence, finished: Finished | None, status: int) -> None:
    """The request's usage record (JSON, no prompt text unless --log-prompts), and its tenant's meters."""
    prompt, completion = len(seq.prompt_ids), len(seq.output_ids)
    if seq.tenant:
        metrics, model = service.metrics, service.settings.model_name
        metrics.tenant_prompt_tokens.labels(model, seq.tenant).inc(prompt)
        metrics.tenant_completion_tokens.labels(model, seq.tenant).inc(completion)
        if "stream" in g:
            g.stream.tokens = prompt + completion  # charged to its tokens per minute when the stream closes
    record = {
        "time": round(time.time(), 3),  # when it ended (Unix seconds): usage reports span the log by it
        "request_id": seq.request_id,
        "tenant": seq.tenant or None,
        "model": service.settings.model_name,
        "route": route,
        "status": status,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "finish_reason": seq.finish_reason,
        "queue_s": round(seq.scheduled_at - seq.arrival, 4) if seq.scheduled_at else None,
        "ttft_s": round(seq.first_token_at - seq.arrival, 4) if seq.first_token_at else None,
        "e2e_s": round(time.perf_counter() - seq.arrival, 4),
    }
    if service.settings.log_prompts:
        record["prompt"] = service.tokenizer.decode(seq.prompt_ids)
    if finished is not None and finished.error:
        record["error"] = finished.error
    request_log.info(json.dumps(record))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
