"""Tenants: who may call a shared server, which models they may use, how much, and their share.

A tenants file (TOML, ``serve --tenants FILE``) lists them; a key is stored only as its SHA-256
(``neuron-serve tenants hash-key KEY`` prints it), so the file can sit in a repository:

    [[tenant]]
    name = "search"                 # the label of its metrics and usage records
    key_sha256 = "9f86d08..."
    models = ["smollm2-135m-cpu"]   # default: every model the server serves
    requests_per_minute = 600       # 0: no limit
    tokens_per_minute = 200000      # prompt + completion tokens; 0: no limit
    max_streams = 16                # requests running or queued at once; 0: no limit
    weight = 2.0                    # its share of admissions when tenants queue (engine/scheduler.py)

Limits are per server worker (replica): each enforces its share, the limit divided by the workers,
rounded up, as gunicorn spreads connections over them. Over a limit, a request gets OpenAI's 429 with
``Retry-After`` and ``x-ratelimit-*`` headers.
"""

from __future__ import annotations

import collections
import math
import re
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

WINDOW_S = 60.0
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Tenant:
    name: str
    key_sha256: str
    models: tuple[str, ...] = ()
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_streams: int = 0
    weight: float = 1.0

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models


def _tenant_errors(i: int, entry: Any) -> list[str]:
    where = f"tenant[{i}]"
    if not isinstance(entry, dict):
        return [f"{where}: must be a table"]
    known = {f.name for f in fields(Tenant)}
    errors = [
        f"{where}.{name}: unknown field; known: {', '.join(sorted(known))}" for name in entry if name not in known
    ]
    if not isinstance(entry.get("name"), str) or not entry.get("name"):
        errors.append(f"{where}.name: a non-empty string is required")
    if not isinstance(entry.get("key_sha256"), str) or not _HEX64.match(entry.get("key_sha256", "")):
        errors.append(f"{where}.key_sha256: the key's SHA-256 as 64 lowercase hex digits is required (never the key)")
    for name in ("requests_per_minute", "tokens_per_minute", "max_streams"):
        value = entry.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            errors.append(f"{where}.{name}: must be an integer >= 0 (0: no limit), got {value!r}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        errors.append(f"{where}.weight: must be a number > 0, got {weight!r}")
    models = entry.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        errors.append(f"{where}.models: must be a list of model names")
    return errors


def load_tenants(path: Path) -> dict[str, Tenant]:
    """The tenants by key digest; a ValueError that lists every problem of the file."""
    try:
        body = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not TOML: {error}") from None
    entries = body.get("tenant", [])
    errors = [] if isinstance(entries, list) and entries else ["tenant: at least one [[tenant]] table is required"]
    entries = entries if isinstance(entries, list) else []
    for i, entry in enumerate(entries):
        errors += _tenant_errors(i, entry)
    if not errors:
        names = [e["name"] for e in entries]
        digests = [e["key_sha256"] for e in entries]
        errors += [f"tenant: the name {n!r} appears twice" for n in sorted({n for n in names if names.count(n) > 1})]
        if len(set(digests)) != len(digests):
            errors.append("tenant: two tenants have the same key")
    if errors:
        raise ValueError(f"{path}: " + "; ".join(errors))
    tenants = [
        Tenant(**{**e, "models": tuple(e.get("models", ())), "weight": float(e.get("weight", 1.0))}) for e in entries
    ]
    return {t.key_sha256: t for t in tenants}


@dataclass
class _Usage:
    requests: collections.deque = field(default_factory=collections.deque)  # admission times
    tokens: collections.deque = field(default_factory=collections.deque)  # (time, tokens) at completion
    streams: int = 0


class Quotas:
    """Each tenant's use of this worker over the last minute, and its open streams (thread-safe)."""

    def __init__(self, replicas: int):
        self.replicas = max(1, replicas)
        self._usage: dict[str, _Usage] = collections.defaultdict(_Usage)
        self._lock = threading.Lock()

    def share(self, limit: int) -> int:
        return math.ceil(limit / self.replicas) if limit else 0

    def admit(self, tenant: Tenant, now: float | None = None) -> tuple[str, float, dict[str, str]]:
        """("", 0, headers) and a stream opened, or (why not, seconds to wait, headers)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            usage = self._usage[tenant.name]
            _expire(usage, now)
            rpm, tpm, streams = (
                self.share(n) for n in (tenant.requests_per_minute, tenant.tokens_per_minute, tenant.max_streams)
            )
            used_tokens = sum(n for _, n in usage.tokens)
            headers = _headers(usage, rpm, tpm, used_tokens, now)
            if rpm and len(usage.requests) >= rpm:
                return f"{rpm} requests per minute", usage.requests[0] + WINDOW_S - now, headers
            if tpm and used_tokens >= tpm:
                return f"{tpm} tokens per minute", usage.tokens[0][0] + WINDOW_S - now, headers
            if streams and usage.streams >= streams:
                return f"{streams} concurrent requests", 1.0, headers
            usage.requests.append(now)
            usage.streams += 1
            return "", 0.0, _headers(usage, rpm, tpm, used_tokens, now)

    def release(self, tenant: Tenant, tokens: int, now: float | None = None) -> None:
        """The stream closed, having used `tokens` (prompt and completion)."""
        with self._lock:
            usage = self._usage[tenant.name]
            usage.streams -= 1
            if tokens:
                usage.tokens.append((time.monotonic() if now is None else now, tokens))


@dataclass
class Stream:
    """One admitted request of a tenant: open until its response closes, then charged its tokens."""

    tenant: Tenant
    tokens: int = 0
    closed: bool = False

    def close(self, quotas: Quotas) -> None:
        if not self.closed:
            self.closed = True
            quotas.release(self.tenant, self.tokens)


def _expire(usage: _Usage, now: float) -> None:
    while usage.requests and usage.requests[0] <= now - WINDOW_S:
        usage.requests.popleft()
    while usage.tokens and usage.tokens[0][0] <= now - WINDOW_S:
        usage.tokens.popleft()


def _headers(usage: _Usage, rpm: int, tpm: int, used_tokens: int, now: float) -> dict[str, str]:
    """OpenAI's rate-limit headers for the limits that are set."""
    headers = {}
    if rpm:
        reset = usage.requests[0] + WINDOW_S - now if usage.requests else 0.0
        headers |= {
            "x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-remaining-requests": str(max(0, rpm - len(usage.requests))),
            "x-ratelimit-reset-requests": f"{max(0.0, reset):.3f}s",
        }
    if tpm:
        reset = usage.tokens[0][0] + WINDOW_S - now if usage.tokens else 0.0
        headers |= {
            "x-ratelimit-limit-tokens": str(tpm),
            "x-ratelimit-remaining-tokens": str(max(0, tpm - used_tokens)),
            "x-ratelimit-reset-tokens": f"{max(0.0, reset):.3f}s",
        }
    return headers
