"""The API key: every route but the health checks asks for it once one is set (``serve --api-key``).

The server keeps only the key's SHA-256 and compares digests in constant time, so neither a log line,
a metric nor a memory dump of the settings holds the key. /ping and /health stay open: SageMaker and
load balancers call them without credentials.
"""

from __future__ import annotations

import hashlib
import hmac

from flask import request

from neuron_serve.server.protocol import APIError

OPEN_ROUTES = frozenset({"/ping", "/health"})


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def require_key(expected_sha256: str) -> None:
    """A 401 in OpenAI's format unless the request carries the key (``Authorization: Bearer KEY``)."""
    if not expected_sha256 or request.path in OPEN_ROUTES:
        return
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise APIError(401, "no API key: send 'Authorization: Bearer <key>'", None, "invalid_request_error")
    if not hmac.compare_digest(key_digest(key.strip()), expected_sha256):
        raise APIError(401, "incorrect API key provided", None, "invalid_request_error")
