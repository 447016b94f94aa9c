"""The streaming server through real gunicorn on 127.0.0.1 and the real `openai` client."""

from __future__ import annotations

import json
import signal
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
from server_handle import ServerHandle

IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)


def sse_events(response) -> list:
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models_lists_the_served_model(client, tiny_server):
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_server.model]
    assert models[0].model_extra["root"] == "tiny"


def test_completion_streaming_and_not_agree(client, tiny_server):
    kwargs = {"model": tiny_server.model, "prompt": "Paris is the capital", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**kwargs, extra_body=IGNORE_EOS)
    assert whole.usage.completion_tokens == 12 and whole.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}, extra_body=IGNORE_EOS)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_streaming_and_not_agree(client, tiny_server):
    kwargs = {
        "model": tiny_server.model,
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 10,
        "temperature": 0,
        "extra_body": IGNORE_EOS,
    }
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_sse_framing(tiny_server):
    body = {"model": tiny_server.model, "prompt": "Köln", "max_tokens": 5, "stream": True, "ignore_eos": True}
    with requests.post(f"{tiny_server.base_url}/v1/completions", json=body, stream=True, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)


def test_batched_greedy_equals_alone_and_seeds_reproduce(client, tiny_server):
    def complete(prompt: str, **extra):
        response = client.completions.create(
            model=tiny_server.model, prompt=prompt, max_tokens=16, extra_body=IGNORE_EOS, **extra
        )
        return response.choices[0].text

    alone = complete("The engine batches", temperature=0)
    seeded_alone = complete("The engine batches", temperature=0.9, seed=11)
    prompts = [f"request {i} about slots" for i in range(10)]
    with ThreadPoolExecutor(12) as pool:
        noise = [pool.submit(complete, p, temperature=0.7) for p in prompts]
        batched = pool.submit(complete, "The engine batches", temperature=0)
        seeded = pool.submit(complete, "The engine batches", temperature=0.9, seed=11)
        [f.result() for f in noise]
    assert batched.result() == alone
    assert seeded.result() == seeded_alone


def test_64_concurrent_streams_share_the_slots(client, tiny_server):
    steps_before = tiny_server.metric("neuron_serve:batch_occupancy_count")
    occupancy_before = tiny_server.metric("neuron_serve:batch_occupancy_sum")

    def stream(i: int) -> tuple[int, int]:
        chunks = list(
            client.completions.create(
                model=tiny_server.model,
                prompt=f"stream number {i}",
                max_tokens=20,
                temperature=0.8,
                seed=i,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=IGNORE_EOS,
            )
        )
        return chunks[-1].usage.completion_tokens, sum(1 for c in chunks if c.choices and c.choices[0].text)

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(stream, range(64)))
    assert all(tokens == 20 for tokens, _ in results)
    assert all(pieces > 1 for _, pieces in results), "tokens arrive as a stream"
    steps = tiny_server.metric("neuron_serve:batch_occupancy_count") - steps_before
    mean_occupancy = (tiny_server.metric("neuron_serve:batch_occupancy_sum") - occupancy_before) / steps
    assert steps < 64 * 20 / 2, "decode steps were shared between requests"
    assert mean_occupancy > 0.5


def test_usage_matches_the_prometheus_counters(client, tiny_server):
    before = tiny_server.metric("neuron_serve:generation_tokens_total", model_name=tiny_server.model)
    prompt_before = tiny_server.metric("neuron_serve:prompt_tokens_total", model_name=tiny_server.model)
    response = client.completions.create(
        model=tiny_server.model, prompt="count me", max_tokens=7, extra_body=IGNORE_EOS
    )
    after = tiny_server.metric("neuron_serve:generation_tokens_total", model_name=tiny_server.model)
    prompt_after = tiny_server.metric("neuron_serve:prompt_tokens_total", model_name=tiny_server.model)
    assert after - before == response.usage.completion_tokens == 7
    assert prompt_after - prompt_before == response.usage.prompt_tokens


def test_too_long_prompt_is_a_400_naming_both_numbers(client, tiny_server):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=tiny_server.model, prompt=list(range(5, 125)), max_tokens=20)
    message = error.value.body["message"]
    assert "120 tokens" in message and "max_tokens (20)" in message and "128" in message
    assert error.value.body["param"] == "max_tokens"


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", 2), ("logprobs", 3), ("temperature", 3.0), ("top_p", 0), ("best_of", 4), ("stop", 5)],
)
def test_unsupported_or_out_of_range_parameters_are_400s(tiny_server, field, value):
    body = {"model": tiny_server.model, "prompt": "x", "max_tokens": 2, field: value, "vllm_extra": "accepted"}
    response = requests.post(f"{tiny_server.base_url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert field in response.json()["error"]["message"]


def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(tiny_server, client):
    bad = requests.post(
        f"{tiny_server.base_url}/v1/chat/completions",
        data="{not json",
        timeout=10,
        headers={"Content-Type": "application/json"},
    )
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    huge = requests.post(f"{tiny_server.base_url}/v1/completions", data=b"x" * (5 * 1024 * 1024), timeout=30)
    assert huge.status_code == 413
    assert client.completions.create(model=tiny_server.model, prompt="still here", max_tokens=2).usage


def test_stop_strings_never_leak(client, tiny_server):
    base = (
        client.completions.create(
            model=tiny_server.model, prompt="stop test", max_tokens=24, temperature=0, extra_body=IGNORE_EOS
        )
        .choices[0]
        .text
    )
    stop = base[5:8]
    assert len(stop) == 3
    chunks = list(
        client.completions.create(
            model=tiny_server.model,
            prompt="stop test",
            max_tokens=24,
            temperature=0,
            stop=[stop],
            stream=True,
            extra_body=IGNORE_EOS,
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == base[: base.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_invocations_plain_and_streaming(tiny_server):
    url = f"{tiny_server.base_url}/invocations"
    body = {"inputs": "Paris is", "parameters": {"max_new_tokens": 6, "ignore_eos": True, "details": True}}
    plain = requests.post(url, json=body, timeout=30).json()
    assert plain["details"]["generated_tokens"] == 6 and isinstance(plain["generated_text"], str)
    with requests.post(url, json=body, headers={"Accept": "text/event-stream"}, stream=True, timeout=30) as r:
        lines = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line]
    assert "".join(e["token"]["text"] for e in lines) == lines[-1]["generated_text"] == plain["generated_text"]
    with requests.post(url, json=body, headers={"Accept": "application/jsonlines"}, stream=True, timeout=30) as r:
        records = [json.loads(line) for line in r.iter_lines(decode_unicode=True) if line]
    assert records[-1]["generated_text"] == plain["generated_text"]


def test_tokenize_and_detokenize(tiny_server):
    tokens = requests.post(f"{tiny_server.base_url}/tokenize", json={"prompt": "Grüße 🙂"}, timeout=10).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 128
    text = requests.post(f"{tiny_server.base_url}/detokenize", json={"tokens": tokens["tokens"]}, timeout=10).json()
    assert text["prompt"] == "Grüße 🙂"


def test_disconnect_frees_the_slot(tiny_server):
    cancelled_before = tiny_server.metric("neuron_serve:request_success_total", finished_reason="cancelled")
    body = {"model": tiny_server.model, "prompt": "a long one", "max_tokens": 120, "stream": True, "ignore_eos": True}
    response = requests.post(f"{tiny_server.base_url}/v1/completions", json=body, stream=True, timeout=30)
    next(response.iter_lines())
    response.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cancelled = tiny_server.metric("neuron_serve:request_success_total", finished_reason="cancelled")
        if cancelled > cancelled_before:
            break
        time.sleep(0.05)
    assert cancelled == cancelled_before + 1
    assert tiny_server.metric("neuron_serve:num_requests_running") == 0


def test_ping_stays_fast_while_the_engine_is_saturated(client, tiny_server):
    def stream(i):
        return list(
            client.completions.create(
                model=tiny_server.model, prompt=f"load {i}", max_tokens=100, stream=True, extra_body=IGNORE_EOS
            )
        )

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(stream, i) for i in range(32)]
        time.sleep(0.3)
        latencies = []
        for _ in range(10):
            started = time.perf_counter()
            assert requests.get(f"{tiny_server.base_url}/ping", timeout=5).status_code == 200
            latencies.append(time.perf_counter() - started)
        busy = tiny_server.metric("neuron_serve:num_requests_running")
        [f.result() for f in futures]
    assert busy > 0, "the engine was busy while /ping was timed"
    assert statistics.median(latencies) < 0.1


def test_full_queue_gives_429_with_retry_after(tiny_artifacts):
    server = ServerHandle(tiny_artifacts, "--max-waiting", "1")
    try:
        body = {"model": "tiny-cpu", "prompt": "fill", "max_tokens": 100, "ignore_eos": True}

        def post(_):
            return requests.post(f"{server.base_url}/v1/completions", json=body, timeout=60)

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(post, range(16)))
        codes = [r.status_code for r in responses]
        assert 429 in codes and 200 in codes
        rejected = next(r for r in responses if r.status_code == 429)
        assert rejected.headers["Retry-After"] == "1" and "queue is full" in rejected.json()["error"]["message"]
    finally:
        server.stop()


def test_sigterm_drains_in_flight_streams(tiny_artifacts):
    server = ServerHandle(tiny_artifacts, "--max-waiting", "32")
    results: list = [None] * 12
    first_chunk = threading.Barrier(13)
    body = {
        "model": "tiny-cpu",
        "prompt": "drain",
        "max_tokens": 100,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }

    def stream(i):
        with requests.post(f"{server.base_url}/v1/completions", json=body, stream=True, timeout=60) as response:
            lines = response.iter_lines(decode_unicode=True)
            collected = [next(lines)]
            first_chunk.wait(timeout=30)
            collected += [line for line in lines if line]
            results[i] = collected

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    try:
        first_chunk.wait(timeout=30)  # every stream has started
        server.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert server.process.wait(timeout=60) == 0
        for lines in results:
            assert lines[-1] == "data: [DONE]"
            assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 100
        # The metrics of the exited server are gone with it, not left in the temp folder.
        assert not (Path(tempfile.gettempdir()) / f"neuron-serve-metrics-{server.process.pid}").exists()
    finally:
        server.stop()


def test_after_sigterm_new_connections_are_refused_and_cut_streams_end_with_an_error(tmp_path):
    """With no drain time left (graceful_timeout_s = 1, one second of margin), the streams still
    running or queued end at once with an error event, never cut without one, and the port refuses
    new connections. Twelve chat streams of 100 tokens over 4 slots, each holding its opening event
    (sent before a slot is free) when the signal comes: some are surely unfinished."""
    import socket

    from conftest import tiny_recipe

    from neuron_serve.compiler.compile import compile_recipe

    artifacts = compile_recipe(tiny_recipe(**{"serve.graceful_timeout_s": 1}), tmp_path / "tiny-cpu").out_dir
    server = ServerHandle(artifacts)
    body = {
        "model": "tiny-cpu",
        "messages": [{"role": "user", "content": "drain"}],
        "max_tokens": 100,  # the chat template's tokens and these fill most of the tiny model's 128
        "stream": True,
        "ignore_eos": True,
    }
    opened = threading.Barrier(13)

    def stream(_) -> list[str]:
        with requests.post(f"{server.base_url}/v1/chat/completions", json=body, stream=True, timeout=60) as response:
            events = response.iter_lines(decode_unicode=True)
            lines = [next(line for line in events if line)]
            opened.wait(timeout=60)
            return lines + [line for line in events if line]

    try:
        with ThreadPoolExecutor(12) as pool:
            streams = pool.map(stream, range(12))
            opened.wait(timeout=60)  # every request is in the server
            server.process.send_signal(signal.SIGTERM)
            results = list(streams)
        # A stream ends with [DONE] after its last event: its finish reason, or the error that cut it.
        assert all(lines[-1] == "data: [DONE]" for lines in results), [lines[-2:] for lines in results]
        last_events = [json.loads(lines[-2][6:]) for lines in results]
        cut = [e for e in last_events if "error" in e]
        assert cut and all("shutting down" in e["error"]["message"] for e in cut), last_events
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()
