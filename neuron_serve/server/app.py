"""The Flask app: OpenAI-compatible and SageMaker routes over the served models (`ServedModels`)."""

from __future__ import annotations

import functools
import math

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from neuron_serve.engine.metrics import render, traffic_profile
from neuron_serve.server.auth import identify
from neuron_serve.server.models import ServedModels
from neuron_serve.server.openapi import openapi_document
from neuron_serve.server.protocol import APIError
from neuron_serve.server.routes import register_routes
from neuron_serve.server.service import ModelService
from neuron_serve.server.tenants import Stream, Tenant

LOOPBACK = ("127.0.0.1", "::1")
GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/invocations"})


def create_app(services: list[ModelService]) -> Flask:
    app = Flask("neuron_serve")
    models = ServedModels(services)
    service = models.default  # server-wide settings (keys, tenants, limits) are every model's
    # Werkzeug cuts a chunked body (which declares no length) off at this length without an error: one
    # byte more than the limit tells `json_body` that it was over.
    app.config["MAX_CONTENT_LENGTH"] = service.settings.max_body_bytes + 1
    app.extensions["models"] = models

    @app.before_request
    def authenticate():
        settings = service.settings
        g.tenant = identify(settings.api_key_sha256, settings.tenants)
        if g.tenant is None:
            return
        if not any(g.tenant.may_use(name) for name in models.names) and request.path != "/v1/models":
            message = f"tenant {g.tenant.name!r} may not use the models served here ({models.served_list()})"
            raise APIError(403, message, "model", "permission_error")
        if request.method == "POST" and request.path in GENERATION_ROUTES:
            open_stream(g.tenant)

    def open_stream(tenant: Tenant) -> None:
        """Count the request against the tenant's quotas, or answer 429; the stream closes with the response."""
        why, wait, g.quota_headers = service.quotas.admit(tenant)
        if why:
            retry = str(max(1, math.ceil(wait)))
            message = f"tenant {tenant.name!r} is over its limit of {why}; retry in {retry} s"
            raise APIError(429, message, None, "rate_limit_exceeded", {**g.quota_headers, "Retry-After": retry})
        g.stream = Stream(tenant)

    @app.after_request
    def close_stream_with_response(response: Response) -> Response:
        """Rate-limit headers, the tenant's request count by status, and its stream closed with the response."""
        response.headers.update(g.get("quota_headers", {}))
        if g.get("tenant") is not None:
            model = g.get("model", service).settings.model_name
            service.metrics.tenant_requests.labels(model, g.tenant.name, str(response.status_code)).inc()
        if "stream" in g:  # a streamed response closes when its last event is sent
            response.call_on_close(functools.partial(g.stream.close, service.quotas))
        return response

    @app.teardown_request
    def close_stream_on_failure(_error) -> None:
        if "stream" in g and _error is not None:  # no response was made: close the stream here
            g.stream.close(service.quotas)

    @app.errorhandler(APIError)
    def api_error(error: APIError):
        response = jsonify(error.body())
        response.status_code = error.status
        response.headers.update(error.headers)
        if error.status == 429:
            response.headers.setdefault("Retry-After", "1")
        if error.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        kind = "invalid_request_error" if error.code < 500 else "server_error"
        return api_error(APIError(error.code, error.description or error.name, None, kind))

    @app.get("/ping")
    def ping():
        return ("", 200) if models.state == "ready" else ("", 503)

    @app.get("/health")
    def health():
        """Every model's state; 200 once all are ready. `model` and `error` name the first one (the
        only one, on a server of one model)."""
        each = {s.settings.model_name: {"status": s.state, **({"error": s.error} if s.error else {})} for s in services}
        body = {"status": models.state, "model": service.settings.model_name, "models": each}
        if service.error:
            body["error"] = service.error
        return jsonify(body), 200 if models.state == "ready" else 503

    @app.get("/openapi.json")
    def openapi():
        return jsonify(openapi_document(models.names))

    @app.get("/metrics")
    def metrics():
        payload, content_type = render()
        return Response(payload, content_type=content_type)

    @app.post("/admin/traffic")
    def write_traffic():
        """Write the traffic profile (every replica's counts, no text) now. Only from this host: the
        other routes serve tenants, this one writes files."""
        if request.remote_addr not in LOOPBACK:
            raise APIError(403, "/admin/traffic answers requests from this host only", None, "permission_error")
        written = []
        for name in models.names:
            profile = traffic_profile(name)
            path = profile.write(service.settings.profile_dir)
            requests_seen = profile.histograms["request_prompt_tokens"].observations
            written.append({"model": name, "path": str(path), "requests": requests_seen})
        return jsonify(written[0] | {"profiles": written})

    register_routes(app)
    return app
