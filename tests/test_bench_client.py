"""The benchmark's streaming client and load runner against canned SSE streams from a local http.server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests

from neuron_serve.bench.client import ClientConfig, SSEDecoder, StreamingClient
from neuron_serve.bench.runner import LoadLevel, fill_output_tokens, run_level
from neuron_serve.bench.workload import BenchRequest

GAP_S = 0.06  # between the chunks the canned server sends


def test_sse_decoder_splits_lines_across_reads():
    dec = SSEDecoder()
    assert dec.feed(b'data: {"a"') == []
    assert dec.feed(b": 1}\r\n\r\n: keep-alive comment\n\nevent: x\ndata:[DONE]\n") == ['{"a": 1}', "[DONE]"]
    assert dec.feed(b"data: tail") == []
    assert dec.close() == ["tail"]


def _events(body: dict, chat: bool) -> Iterator[tuple[float, dict | str]]:
    """(delay before, event) pairs of the canned stream that the prompt asks for."""
    prompt = body["messages"][0]["content"] if chat else body["prompt"]
    if chat:
        yield 0.0, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    for i in range(body["max_tokens"]):
        if prompt == "boom" and i == 2:
            yield 0.0, {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
            return
        text = {"delta": {"content": f" t{i}"}} if chat else {"text": f" t{i}"}
        yield GAP_S, {"choices": [{"index": 0, **text}]}
    if prompt != "no-usage":
        usage = {"prompt_tokens": 7, "completion_tokens": body["max_tokens"], "total_tokens": 7 + body["max_tokens"]}
        yield 0.0, {"choices": [], "usage": usage}
    yield 0.0, "[DONE]"


class CannedOpenAI(BaseHTTPRequestHandler):
    """Streams canned SSE; the prompt picks the case: "boom", "no-usage", "too-long", "close-delimited",
    and "reject-eos" (a server that refuses the ignore_eos field)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chat = self.path.endswith("/chat/completions")
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        if prompt == "too-long":
            return self._json(400, {"error": {"message": "prompt is longer than 128 tokens", "type": "BadRequest"}})
        if prompt == "reject-eos" and "ignore_eos" in body:
            return self._json(400, {"error": {"message": "Unrecognized request argument: ignore_eos"}})
        chunked = prompt != "close-delimited"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding" if chunked else "Connection", "chunked" if chunked else "close")
        self.end_headers()
        for delay, event in _events(body, chat):
            time.sleep(delay)
            data = f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            self.wfile.flush()
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = not chunked


@pytest.fixture(scope="module")
def api_base() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), CannedOpenAI)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def send(api_base: str, prompt: str, max_tokens: int = 4, endpoint: str = "completions", client=None):
    client = client or StreamingClient(ClientConfig(api_base, "m", endpoint))
    with requests.Session() as session:
        return client.send(session, BenchRequest(prompt, 5, max_tokens), 0, threading.Event())


@pytest.mark.parametrize("prompt", ["chunked", "close-delimited"])
def test_each_chunk_is_timed_when_it_arrives(api_base, prompt):
    rec = send(api_base, prompt, max_tokens=4)
    assert rec.success and rec.error_type == ""
    assert rec.generated_text == " t0 t1 t2 t3"
    assert len(rec.itl) == 3
    # Sent GAP_S apart: had the client buffered the stream, all four would arrive at once.
    assert rec.latency - rec.ttft > 2 * GAP_S * 0.8
    assert rec.latency == pytest.approx(rec.ttft + sum(rec.itl))
    assert (rec.output_tokens, rec.prompt_len, rec.output_tokens_source) == (4, 7, "usage")


def test_chat_ttft_waits_for_the_first_content(api_base):
    rec = send(api_base, "hi", max_tokens=3, endpoint="chat")
    assert rec.success and rec.generated_text == " t0 t1 t2"
    assert rec.ttft >= GAP_S * 0.8  # the role-only chunk that came at once does not count
    assert len(rec.itl) == 2


def test_http_error_is_counted_with_the_servers_message(api_base):
    rec = send(api_base, "too-long")
    assert not rec.success
    assert (rec.error_type, rec.error) == ("HTTP 400", "prompt is longer than 128 tokens")


def test_error_in_the_middle_of_the_stream(api_base):
    rec = send(api_base, "boom", max_tokens=5)
    assert not rec.success
    assert (rec.error_type, rec.error) == ("stream: InternalServerError", "engine died")
    assert rec.generated_text == " t0 t1"


def test_refused_connection_is_an_error_not_a_crash():
    rec = send("http://127.0.0.1:9/v1", "hi")
    assert (rec.success, rec.error_type) == (False, "ConnectionError")


def test_rejected_ignore_eos_is_retried_without_it(api_base):
    client = StreamingClient(ClientConfig(api_base, "m"))
    assert client.payload(BenchRequest("p", 1, 4), True)["ignore_eos"] is True
    rec = send(api_base, "reject-eos", client=client)
    assert rec.success and client.ignore_eos.state == "unsupported"
    assert "ignore_eos" in client.ignore_eos.note
    assert "ignore_eos" not in client.payload(BenchRequest("p", 1, 4), client.ignore_eos.send)
    # A server that takes the field: confirmed once, and a later HTTP 400 is not retried.
    client = StreamingClient(ClientConfig(api_base, "m"))
    assert send(api_base, "ok", client=client).success and client.ignore_eos.state == "supported"
    assert send(api_base, "too-long", client=client).error_type == "HTTP 400"
    assert client.ignore_eos.state == "supported"


def test_payload_asks_for_usage_and_greedy_decoding():
    body = StreamingClient(ClientConfig("http://x/v1", "m", "chat")).payload(BenchRequest("p", 1, 9), False)
    assert body == {
        "model": "m",
        "max_tokens": 9,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "p"}],
    }


def test_run_level_counts_errors_and_fills_missing_usage(api_base):
    client = StreamingClient(ClientConfig(api_base, "m"))
    reqs = [BenchRequest(p, 5, 3) for p in ("a", "too-long", "no-usage", "boom", "b")]
    run = run_level(client, LoadLevel(2), reqs, np.random.default_rng(0), progress=False)
    assert (len(run.records), run.cancelled, run.interrupted) == (5, 0, False)
    ordered = sorted(run.records, key=lambda r: r.index)
    by_prompt = dict(zip(("a", "too-long", "no-usage", "boom", "b"), ordered, strict=True))
    assert [r.success for r in by_prompt.values()] == [True, False, True, False, True]
    assert by_prompt["no-usage"].output_tokens is None
    fill_output_tokens(run.records, tok=None)
    assert (by_prompt["no-usage"].output_tokens, by_prompt["no-usage"].output_tokens_source) == (3, "chunks")
    assert all(r.arrival_time >= run.started_at and r.start_time >= r.arrival_time for r in run.records)
