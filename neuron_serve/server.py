"""The Flask app: OpenAI-compatible and SageMaker routes over one `ModelService`."""

from __future__ import annotations

import json
import logging
import select
import socket
import time
import uuid
from collections.abc import Iterator
from queue import Empty

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from neuron_serve.api_params import APIError
from neuron_serve.engine import QueueFullError
from neuron_serve.metrics import render
from neuron_serve.sequence import Delta, Finished, Sequence
from neuron_serve.service import ModelService

request_log = logging.getLogger("neuron_serve.requests")


def create_app(service: ModelService) -> Flask:
    app = Flask("neuron_serve")
    app.config["MAX_CONTENT_LENGTH"] = service.settings.max_body_bytes
    app.extensions["service"] = service

    @app.errorhandler(APIError)
    def api_error(error: APIError):
        response = jsonify(error.body())
        response.status_code = error.status
        if error.status == 429:
            response.headers["Retry-After"] = "1"
        return response

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        kind = "invalid_request_error" if error.code < 500 else "server_error"
        return api_error(APIError(error.code, error.description or error.name, None, kind))

    @app.get("/ping")
    def ping():
        return ("", 200) if service.state == "ready" else ("", 503)

    @app.get("/health")
    def health():
        body = {"status": service.state, "model": service.settings.model_name}
        if service.error:
            body["error"] = service.error
        return jsonify(body), 200 if service.state == "ready" else 503

    @app.get("/metrics")
    def metrics():
        payload, content_type = render()
        return Response(payload, content_type=content_type)

    from neuron_serve.routes import register_routes

    register_routes(app, service)
    return app


def ready_service() -> ModelService:
    from flask import current_app

    service: ModelService = current_app.extensions["service"]
    if service.state != "ready":
        detail = f": {service.error}" if service.error else ""
        raise APIError(503, f"the model is {service.state}{detail}", None, "service_unavailable")
    return service


def json_body() -> dict:
    from flask import current_app

    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and request.content_length > limit:
        raise APIError(413, f"the request body has {request.content_length} bytes; the limit is {limit} bytes")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def submit(service: ModelService, prompt_ids: list[int], params) -> Sequence:
    seq = Sequence(prompt_ids, params, service.tokenizer, service.eos_ids)
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


def events(seq: Sequence) -> Iterator[Delta | Finished]:
    """The sequence's events as they come; cancels it when the client goes away."""
    try:
        while True:
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
    record = {
        "request_id": seq.request_id,
        "route": route,
        "status": status,
        "prompt_tokens": len(seq.prompt_ids),
        "completion_tokens": len(seq.output_ids),
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
