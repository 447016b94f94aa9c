"""Hostile and malformed requests against a real server: each gets a 4xx that names the problem, costs
no more than linear work, and the server keeps serving everyone else (issue 16's defects, one test
each)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

ROUTES = ("/v1/completions", "/v1/chat/completions", "/invocations", "/tokenize")


def post(server, route: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return requests.post(f"{server.base_url}{route}", data=data, headers=headers, timeout=60, **kwargs)


def completion(server, **fields) -> dict:
    return {"model": server.model, "prompt": "hello", "max_tokens": 2, **fields}


def chat(server, **fields) -> dict:
    return {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def assert_400(response: requests.Response, *words: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert all(word in error["message"] for word in words), error["message"]


def still_serving(server) -> None:
    response = post(server, "/v1/completions", completion(server))
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("route", ROUTES)
def test_deeply_nested_json_is_a_400_on_every_route(tiny_server, route):
    assert_400(post(tiny_server, route, '{"a":' + "[" * 100_000), "nests too deeply")
    still_serving(tiny_server)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_out_of_64_bits_is_a_400_naming_the_range(tiny_server, seed):
    assert_400(post(tiny_server, "/v1/completions", completion(tiny_server, seed=seed)), "seed", "must be in")
    assert_400(post(tiny_server, "/v1/chat/completions", chat(tiny_server, seed=seed)), "seed")
    body = {"inputs": "hello", "parameters": {"seed": seed, "max_new_tokens": 2}}
    assert_400(post(tiny_server, "/invocations", body), "seed")
    ok = post(tiny_server, "/v1/completions", completion(tiny_server, seed=2**64 - 1))
    assert ok.status_code == 200


@pytest.mark.parametrize("ids", [["a"], [[1]], [None], [True]])
def test_stop_token_ids_that_are_not_integers_are_400s(tiny_server, ids):
    assert_400(post(tiny_server, "/v1/completions", completion(tiny_server, stop_token_ids=ids)), "stop_token_ids")


@pytest.mark.parametrize("text", [123, ["a"], None])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
def test_a_content_part_whose_text_is_not_a_string_is_a_400(tiny_server, route, text):
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    assert_400(post(tiny_server, route, chat(tiny_server, messages=messages)), "content[0].text must be a string")


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/completions", {"prompt": "\ud800x"}),
        ("/invocations", {"inputs": "\ud800x"}),
        ("/tokenize", {"prompt": "\ud800x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\udfffb"}]}),
    ],
)
def test_a_lone_surrogate_is_a_400(tiny_server, route, body):
    # json.dumps writes the lone surrogate as the \ud800 escape, as a hostile client would.
    assert_400(post(tiny_server, route, {"model": tiny_server.model, **body}), "not valid Unicode", "lone surrogate")


@pytest.mark.parametrize("value", ["no", [1], 1])
def test_tokenize_add_special_tokens_must_be_a_boolean(tiny_server, value):
    body = {"prompt": "hello", "add_special_tokens": value}
    assert_400(post(tiny_server, "/tokenize", body), "add_special_tokens", "true or false")


def test_bad_stream_options_are_refused_before_the_request_is_queued(tiny_server):
    success = "neuron_serve:request_success_total"
    before = tiny_server.metric(success)
    for options, named in (("x", "stream_options"), (3, "stream_options"), ({"include_usage": "yes"}, "include_usage")):
        body = completion(tiny_server, stream=True, stream_options=options)
        assert_400(post(tiny_server, "/v1/completions", body), named)
    assert_400(post(tiny_server, "/v1/completions", completion(tiny_server, stream="yes")), "stream")
    # A request queued before its refusal would have run first and finished by the time this one has.
    still_serving(tiny_server)
    assert tiny_server.metric(success) == before + 1, "a refused request ran anyway"


def test_long_stop_strings_cost_linear_time_and_stall_no_one(tiny_server):
    """16 stop strings of 250,000 characters, the most a 4 MB body holds: the quadratic filter took the
    engine thread minutes per token with these (every other stream of the replica waiting); with the
    automaton the request is answered within the client's timeout, and so is a request beside it."""
    stops = [("ab" * 125_000)[i:] + "z" * i for i in range(16)]
    body = completion(tiny_server, stop=stops, max_tokens=16, ignore_eos=True)
    with ThreadPoolExecutor(2) as pool:
        hostile = pool.submit(post, tiny_server, "/v1/completions", body)
        beside = pool.submit(
            post, tiny_server, "/v1/completions", completion(tiny_server, max_tokens=16, ignore_eos=True)
        )
        for response in (hostile.result(), beside.result()):
            assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 16


def test_the_stop_filter_agrees_with_a_plain_search():
    """Whatever the stop strings, the text sent is the text before the first stop string ends."""
    import random

    from neuron_serve.engine.stop_strings import StopStringFilter

    rng = random.Random(0)
    for _ in range(300):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3)))
        pieces = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 4))) for _ in range(8)]
        text = "".join(pieces)
        ends = {s: text.find(s) + len(s) for s in stops if s in text}
        stop_filter, sent, hit = StopStringFilter(stops), "", False
        for piece in pieces:
            out, hit = stop_filter.push(piece)
            sent += out
            if hit:
                break
        if ends:
            first_end = min(ends.values())
            first = max((s for s, end in ends.items() if end == first_end), key=len)
            assert hit and sent == text[: first_end - len(first)], (stops, pieces)
        else:
            assert not hit and sent + stop_filter.flush() == text


def test_an_over_long_prompt_is_refused_before_the_tokenizer(tiny_server):
    """A prompt longer than max_seq_len x the longest token cannot fit: 400 without tokenizing."""
    prompt = "word " * 200_000
    assert_400(post(tiny_server, "/v1/completions", completion(tiny_server, prompt=prompt)), "characters", "128 tokens")
    assert_400(post(tiny_server, "/tokenize", {"prompt": prompt}), "characters", "at most 65536")
    long_count = post(tiny_server, "/tokenize", {"prompt": "word " * 2_000})  # longer than any prompt: counted
    assert long_count.status_code == 200 and long_count.json()["count"] > 128
    messages = [{"role": "user", "content": prompt}]
    assert_400(post(tiny_server, "/v1/chat/completions", chat(tiny_server, messages=messages)), "characters")
    assert_400(post(tiny_server, "/invocations", {"inputs": prompt}), "characters")
    still_serving(tiny_server)


def test_null_means_the_default_and_unsupported_fields_are_refused_by_name(tiny_server):
    for name in ("n", "best_of", "echo", "min_tokens", "logprobs", "suffix"):
        assert post(tiny_server, "/v1/completions", completion(tiny_server, **{name: None})).status_code == 200
    for name, value in (
        ("min_p", 0.1),
        ("bad_words", ["x"]),
        ("allowed_token_ids", [1]),
        ("guided_grammar", "x"),
        ("structured_outputs", {"regex": "a"}),
        ("use_beam_search", True),
        ("typical_p", 0.5),
        ("n", True),  # JSON's true is not the number 1
    ):
        assert_400(post(tiny_server, "/v1/completions", completion(tiny_server, **{name: value})), name)
    for name, value in (("continue_final_message", True), ("chat_template", "{{ x }}")):
        assert_400(post(tiny_server, "/v1/chat/completions", chat(tiny_server, **{name: value})), name)
    for name, value in (
        ("watermark", True),
        ("truncate", 1),
        ("top_n_tokens", 2),
        ("grammar", {}),
        ("best_of", 2),
        ("details", 1.5),  # found by the fuzz: any truthy value was taken for true
        ("return_full_text", "yes"),
    ):
        body = {"inputs": "hello", "parameters": {name: value, "max_new_tokens": 2}}
        assert_400(post(tiny_server, "/invocations", body), f"parameters.{name}")


def test_an_unknown_or_missing_model_is_refused_as_openai_does(tiny_server):
    assert_400(
        post(tiny_server, "/v1/completions", completion(tiny_server, model="gpt-4")),
        "'gpt-4' does not exist",
        status=404,
    )
    assert_400(post(tiny_server, "/v1/completions", completion(tiny_server, model=7)), "7 does not exist", status=404)
    body = completion(tiny_server)
    del body["model"]
    assert_400(post(tiny_server, "/v1/completions", body), "'model' is required")


def test_a_chunked_body_over_the_limit_is_a_413(tiny_server):
    def chunks():
        for _ in range(5):
            yield b" " * (1024 * 1024)

    response = requests.post(f"{tiny_server.base_url}/v1/completions", data=chunks(), timeout=60)
    assert_400(response, "limit", status=413)


def test_a_body_without_content_type_is_read_as_json(tiny_server):
    response = requests.post(
        f"{tiny_server.base_url}/v1/completions", data=json.dumps(completion(tiny_server)), timeout=60
    )
    assert response.status_code == 200, response.text


def test_error_messages_do_not_echo_huge_values(tiny_server):
    response = post(tiny_server, "/v1/completions", completion(tiny_server, stop=["x" * 200_000] * 17))
    assert_400(response, "stop")
    assert len(response.content) < 2_000


def test_accept_is_read_by_quality_not_by_substring(tiny_server):
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 3}}
    prefers_json = {"Accept": "application/json;q=0.9, text/event-stream;q=0.1"}
    response = post(tiny_server, "/invocations", body, headers=prefers_json)
    assert response.headers["Content-Type"].startswith("application/json") and "generated_text" in response.json()


def test_the_last_tgi_event_carries_the_last_token_and_the_whole_text(tiny_server):
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 5, "ignore_eos": True}}
    with post(tiny_server, "/invocations", body, headers={"Accept": "text/event-stream"}, stream=True) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line]
    assert len(events) == 5 and all(e["token"]["id"] is not None for e in events)
    assert "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"]
    assert [e["generated_text"] is None for e in events] == [True] * 4 + [False]


def test_invocations_accepts_lmis_chat_schema(tiny_server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    response = post(tiny_server, "/invocations", body)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion" and response.json()["usage"]["completion_tokens"] <= 3


def test_many_hostile_requests_at_once_leave_the_server_serving(tiny_server):
    bodies = [
        ("/v1/completions", '{"a":' + "[" * 50_000),
        ("/v1/completions", json.dumps(completion(tiny_server, seed=2**70))),
        ("/tokenize", json.dumps({"prompt": "\ud800"})),
        ("/v1/completions", json.dumps(completion(tiny_server, prompt="word " * 100_000))),
    ] * 5
    statuses = []

    def send(route, data):
        connection = http.client.HTTPConnection("127.0.0.1", tiny_server.port, timeout=60)
        connection.request("POST", route, body=data, headers={"Content-Type": "application/json"})
        statuses.append(connection.getresponse().status)
        connection.close()

    threads = [threading.Thread(target=send, args=pair) for pair in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(statuses)) == [400]
    still_serving(tiny_server)


def test_a_request_cancelled_in_the_queue_is_counted_and_logged(tiny_server):
    """Every slot busy (the tiny recipe has 4), a fifth request waits; its client leaves."""
    cancelled = "neuron_serve:request_success_total"
    before = tiny_server.metric(cancelled, finished_reason="cancelled")
    long = completion(tiny_server, max_tokens=120, ignore_eos=True)
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(post, tiny_server, "/v1/completions", long) for _ in range(4)]
        time.sleep(0.05)  # the four hold the slots
        waiting = http.client.HTTPConnection("127.0.0.1", tiny_server.port, timeout=60)
        body = json.dumps(completion(tiny_server, stream=True))
        waiting.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        time.sleep(0.05)  # queued behind the four
        waiting.close()
        assert all(f.result().status_code == 200 for f in running)
    deadline = time.monotonic() + 10
    while tiny_server.metric(cancelled, finished_reason="cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tiny_server.metric(cancelled, finished_reason="cancelled") == before + 1
    records = [json.loads(line) for line in tiny_server.logs().splitlines() if line.startswith('{"time"')]
    assert any(r["status"] == 499 and r["completion_tokens"] == 0 for r in records)


def test_slowloris_connections_hold_no_thread(tiny_server):
    """More half-sent request heads than the worker has threads (28 for the tiny recipe)."""
    import socket

    held = []
    try:
        for _ in range(40):
            connection = socket.create_connection(("127.0.0.1", tiny_server.port))
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            held.append(connection)
        time.sleep(0.5)  # every head is with the server
        for _ in range(5):
            assert requests.get(f"{tiny_server.base_url}/ping", timeout=5).status_code == 200
        still_serving(tiny_server)
    finally:
        for connection in held:
            connection.close()


def test_an_api_key_guards_every_route_but_the_health_checks(tiny_artifacts):
    import openai
    from server_handle import ServerHandle

    server = ServerHandle(tiny_artifacts, "--api-key", "s3cret-key")
    try:
        for path in ("/ping", "/health"):
            assert requests.get(f"{server.base_url}{path}", timeout=10).status_code == 200
        assert_400(post(server, "/v1/completions", completion(server)), "no API key", status=401)
        assert_400(post(server, "/invocations", {"inputs": "hi"}), "no API key", status=401)
        wrong = {"Authorization": "Bearer nope"}
        assert_400(post(server, "/v1/completions", completion(server), headers=wrong), "incorrect API key", status=401)
        assert requests.get(f"{server.base_url}/metrics", timeout=10).status_code == 401
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="s3cret-key", max_retries=0)
        assert client.completions.create(model=server.model, prompt="hi", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0).models.list()
        assert "s3cret-key" not in server.logs()
    finally:
        server.stop()


def test_the_recipe_caps_max_tokens_per_request():
    from conftest import tiny_recipe

    from neuron_serve.recipe.validation import recipe_errors
    from neuron_serve.server.protocol import APIError, Limits, sampling_params

    limits = Limits(max_seq_len=2048, vocab_size=100, max_tokens_default=16, longest_token=8, max_tokens_cap=64)
    assert sampling_params({"max_tokens": 64}, 10, limits, "max_tokens").max_tokens == 64
    with pytest.raises(APIError, match=r"max_tokens \(65\) is over this server's cap of 64"):
        sampling_params({"max_tokens": 65}, 10, limits, "max_tokens")
    capped = tiny_recipe(**{"serve.max_tokens_cap": 16})
    assert recipe_errors(capped) == ["serve.max_tokens_default: must be at most serve.max_tokens_cap (16), got 32"]


def test_tiny_penalties_and_temperatures_cannot_fail_the_batch(tiny_server):
    """Found by the fuzz: a repetition penalty of 5e-324 (or a temperature as small) overflowed the
    logits to inf, and the nan it made failed every stream of the replica's step; a top_p of 5e-324
    rounded to 0 in float32 and kept no token at all."""
    long = completion(tiny_server, max_tokens=60, ignore_eos=True)
    with ThreadPoolExecutor(2) as pool:
        beside = pool.submit(post, tiny_server, "/v1/completions", long)
        time.sleep(0.05)
        bad = post(tiny_server, "/v1/completions", completion(tiny_server, repetition_penalty=5e-324))
        assert_400(bad, "repetition_penalty", "[0.01, 10.0]")
        tiny = post(tiny_server, "/v1/completions", completion(tiny_server, temperature=5e-324, max_tokens=8))
        greedy = post(tiny_server, "/v1/completions", completion(tiny_server, temperature=0, max_tokens=8))
        assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
        nucleus = post(tiny_server, "/v1/completions", completion(tiny_server, top_p=5e-324, max_tokens=8))
        assert (
            nucleus.status_code == 200 and nucleus.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
        )
        assert beside.result().status_code == 200
