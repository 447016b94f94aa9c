"""One streaming request to an OpenAI-compatible server, timed the way vLLM's benchmark times it.

Threads with ``requests`` rather than asyncio: ``requests`` is already a dependency of the package (aiohttp
and httpx are not), a thread per in-flight request is cheap at the concurrencies a benchmark runs (tens to
a few hundred), and each thread stamps a chunk's arrival right after its own socket read returns, so no
event loop that is busy with other streams can delay the timestamp.

Timing, as in vLLM: TTFT is the time from sending to the first chunk that carries text, each later text
chunk adds one inter-token latency (ITL), and the end-to-end latency (E2EL) ends at the last text chunk.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import requests

from neuron_serve.bench.workload import BenchRequest

CANCELLED = "cancelled"  # the run was stopped (Ctrl-C) while this request was in flight: not an error
_MAX_ERROR_CHARS = 300


@dataclass
class ClientConfig:
    api_base: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    endpoint: str = "completions"  # or "chat"
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout_s: float = 600.0  # longest silence between two reads of one stream
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"{self.api_base}/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"


@dataclass
class RequestRecord:
    index: int
    expected_prompt_len: int | None
    max_tokens: int
    prompt_len: int | None = None  # the server's usage.prompt_tokens when it sends usage
    arrival_time: float = 0.0  # perf_counter() when the load generator released the request
    start_time: float = 0.0  # perf_counter() when it was sent
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int | None = None
    output_tokens_source: str = ""  # "usage", "tokenizer" or "chunks"
    generated_text: str = ""
    success: bool = False
    error_type: str = ""
    error: str = ""

    @property
    def cancelled(self) -> bool:
        return self.error_type == CANCELLED


class SSEDecoder:
    """Splits a byte stream into the payloads of its ``data:`` lines; comments and other fields are dropped."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return [p for p in map(_data_payload, lines) if p is not None]

    def close(self) -> list[str]:
        """The last line, when the stream ended without a newline after it."""
        rest, self._buf = self._buf, b""
        payload = _data_payload(rest)
        return [payload] if payload is not None else []


def _data_payload(line: bytes) -> str | None:
    line = line.rstrip(b"\r")
    if not line.startswith(b"data:"):
        return None
    return line[5:].strip().decode("utf-8")


class IgnoreEosSupport:
    """Whether the server takes the non-standard ``ignore_eos`` field, learnt from its first answers.

    Until a request that carried it succeeds, an HTTP 400 is retried once without it; if the retry works,
    the server rejects the field and no later request sends it (the note says so in the results).
    """

    def __init__(self, wanted: bool):
        self.state = "unknown" if wanted else "off"
        self.note = "" if wanted else "ignore_eos was not requested (--no-ignore-eos)"
        self._lock = threading.Lock()

    @property
    def send(self) -> bool:
        return self.state in ("unknown", "supported")

    def confirm(self) -> None:
        with self._lock:
            if self.state == "unknown":
                self.state = "supported"

    def reject(self, error: str) -> None:
        with self._lock:
            self.state = "unsupported"
            self.note = f"the server rejected ignore_eos ({error}); sent without it, outputs may end early"


class StreamingClient:
    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.ignore_eos = IgnoreEosSupport(cfg.ignore_eos)
        self._headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}
        if cfg.api_key:
            self._headers["Authorization"] = f"Bearer {cfg.api_key}"

    def payload(self, req: BenchRequest, ignore_eos: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "max_tokens": req.max_tokens,
            "temperature": self.cfg.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.cfg.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        if ignore_eos:
            body["ignore_eos"] = True
        return body

    def send(self, session: requests.Session, req: BenchRequest, index: int, stop: threading.Event) -> RequestRecord:
        with_eos = self.ignore_eos.send
        rec = self._attempt(session, req, index, with_eos, stop)
        if with_eos and rec.success:
            self.ignore_eos.confirm()
        elif with_eos and rec.error_type == "HTTP 400" and self.ignore_eos.state == "unknown":
            retry = self._attempt(session, req, index, False, stop)
            if retry.success:
                self.ignore_eos.reject(rec.error)
                return retry
        return rec

    def _attempt(
        self, session: requests.Session, req: BenchRequest, index: int, ignore_eos: bool, stop: threading.Event
    ) -> RequestRecord:
        rec = RequestRecord(index, req.prompt_len, req.max_tokens, prompt_len=req.prompt_len)
        body = self.payload(req, ignore_eos)
        rec.start_time = time.perf_counter()
        try:
            with session.post(
                self.cfg.url, json=body, headers=self._headers, stream=True, timeout=(30, self.cfg.timeout_s)
            ) as resp:
                if resp.status_code != 200:
                    rec.error_type, rec.error = f"HTTP {resp.status_code}", _error_message(resp)
                    return rec
                self._read_stream(resp, rec, stop)
        except requests.RequestException as exc:
            rec.error_type, rec.error = type(exc).__name__, str(exc)[:_MAX_ERROR_CHARS]
            return rec
        if not rec.error_type and not rec.generated_text:
            rec.error_type, rec.error = "empty_stream", "the stream ended without a chunk that carries text"
        rec.success = not rec.error_type
        return rec

    def _read_stream(self, resp: requests.Response, rec: RequestRecord, stop: threading.Event) -> None:
        decoder = SSEDecoder()
        last = rec.start_time
        for chunk in _raw_chunks(resp):
            now = time.perf_counter()
            if stop.is_set():
                rec.error_type = CANCELLED
                return
            for payload in decoder.feed(chunk):
                last, done = self._on_event(payload, rec, now, last)
                if done:
                    return
        for payload in decoder.close():
            self._on_event(payload, rec, time.perf_counter(), last)

    def _on_event(self, payload: str, rec: RequestRecord, now: float, last: float) -> tuple[float, bool]:
        """Applies one SSE event to the record; returns the time of the last text chunk and whether the
        stream is over ([DONE] or an error)."""
        if payload == "[DONE]":
            return last, True
        try:
            data = json.loads(payload)
        except json.JSONDecodeError:
            rec.error_type, rec.error = "bad_sse_json", payload[:_MAX_ERROR_CHARS]
            return last, True
        if data.get("error"):
            rec.error_type, rec.error = _stream_error(data["error"])
            return last, True
        if usage := data.get("usage"):
            rec.output_tokens = usage.get("completion_tokens", rec.output_tokens)
            rec.prompt_len = usage.get("prompt_tokens", rec.prompt_len)
            rec.output_tokens_source = "usage"
        text = self._content(data)
        if not text:
            return last, False
        if rec.generated_text:
            rec.itl.append(now - last)
        else:
            rec.ttft = now - rec.start_time
        rec.generated_text += text
        rec.latency = now - rec.start_time
        return now, False

    def _content(self, data: dict[str, Any]) -> str:
        choices = data.get("choices") or []
        if not choices:
            return ""
        if self.cfg.endpoint == "chat":
            delta = choices[0].get("delta") or {}
            return delta.get("content") or delta.get("reasoning_content") or ""
        return choices[0].get("text") or ""


def _raw_chunks(resp: requests.Response) -> Iterator[bytes]:
    """Bytes as they arrive: urllib3 2's ``read1`` returns what one socket read brought (HTTP chunked or
    not), where ``iter_content(size)`` would wait for ``size`` bytes and blur the chunk timings."""
    while chunk := resp.raw.read1(65536):
        yield chunk


def _stream_error(err: Any) -> tuple[str, str]:
    if isinstance(err, dict):
        kind = err.get("type") or err.get("code") or "error"
        return f"stream: {kind}", str(err.get("message", err))[:_MAX_ERROR_CHARS]
    return "stream: error", str(err)[:_MAX_ERROR_CHARS]


def _error_message(resp: requests.Response) -> str:
    """The server's own words for an HTTP error: OpenAI's error.message, else the body text."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:_MAX_ERROR_CHARS]
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        err = err.get("message") or err.get("detail") or err
    return str(err)[:_MAX_ERROR_CHARS]
