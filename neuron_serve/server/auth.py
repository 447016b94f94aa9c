"""Who is calling: every route but the health checks asks for a key once the server has one
(``serve --api-key``) or a tenants file (``serve --tenants``, ``server/tenants.py``).

The server keeps only keys' SHA-256 digests and looks a caller's up by its digest (one key: compared
in constant time), so neither a log line, a metric nor a memory dump of the settings holds a key.
/ping and /health stay open: SageMaker and load balancers call them without credentials.
"""

from __future__ import annotations

import hashlib
import hmac

from flask import request

from neuron_serve.server.protocol import APIError
from neuron_serve.server.tenants import Tenant

OPEN_ROUTES = frozenset({"/ping", "/health"})


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def identify(expected_sha256: str, tenants: dict[str, Tenant]) -> Tenant | None:
    """The calling tenant (None: no tenants file, or an open route), or a 401 in OpenAI's format when
    the request lacks the key (``Authorization: Bearer KEY``) or has a wrong one."""
    if not (expected_sha256 or tenants) or request.path in OPEN_ROUTES:
        return None
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "no API key: send 'Authorization: Bearer <key>'", None, "invalid_request_error")
    digest = key_digest(key.strip())
    if tenants:
        if digest not in tenants:
            raise APIError(401, "incorrect API key provided", None, "invalid_request_error")
        return tenants[digest]
    if not hmac.compare_digest(digest, expected_sha256):
        raise APIError(401, "incorrect API key provided", None, "invalid_request_error")
    return None
