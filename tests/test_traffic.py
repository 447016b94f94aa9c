"""The traffic profile: counts of what a deployment served, summed over its replicas, written on demand
and at shutdown, never its text."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from server_handle import ServerHandle

from neuron_serve.artifact.traffic import (
    HISTOGRAMS,
    LENGTH_BINS,
    SCHEMA,
    TTFT,
    Binned,
    TrafficProfile,
    TrafficProfileError,
)

WORD = "zebra"  # in every prompt, so that a profile holding text would show it


def test_a_profile_reads_back_as_written_and_merges(tmp_path):
    counts = [0] * len(LENGTH_BINS)
    counts[2] = 5  # five prompts of 33..48 tokens
    profile = TrafficProfile("demo", {"request_prompt_tokens": Binned(LENGTH_BINS, counts, 1, 250.0)})
    profile.graphs = {"step_prompt_64": (50, 64)}
    path = profile.write(tmp_path)
    assert path.parent == tmp_path / "demo" and path.name.startswith("traffic-")
    again = TrafficProfile.read(path)
    assert again.histograms["request_prompt_tokens"].by_length() == {48: 5}
    assert again.histograms["request_prompt_tokens"].observations == 6
    both = again.merged(again).histograms["request_prompt_tokens"]
    assert (both.by_length(), both.overflow, both.total) == ({48: 10}, 2, 500.0)
    assert again.merged(again).graphs == {"step_prompt_64": (100, 128)}


def test_quantiles_are_the_upper_bound_of_their_bin():
    latencies = Binned((0.1, 0.5, 1.0), [6, 3, 1], overflow=0)
    assert [latencies.quantile(q) for q in (0.5, 0.6, 0.9, 0.99)] == [0.1, 0.1, 0.5, 1.0]
    assert Binned((0.1,), [1], overflow=1).quantile(0.99) == float("inf")


def test_another_schema_is_refused_by_name(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "neuron-monitor", "histograms": {}}))
    with pytest.raises(TrafficProfileError, match=f"other.json: schema 'neuron-monitor', expected '{SCHEMA}'"):
        TrafficProfile.read(other)
    other.write_text("{")
    with pytest.raises(TrafficProfileError, match="not a neuron-serve-traffic/1 traffic profile"):
        TrafficProfile.read(other)


def wait_for_replicas(server: ServerHandle, count: int, timeout: float = 120) -> None:
    """ServerHandle is ready when one replica is; a request to one still loading gets 503."""
    deadline = time.monotonic() + timeout
    while Path(server.log.name).read_text().count(f"model {server.model} ready") < count:
        server.log.flush()
        assert time.monotonic() < deadline, server.logs()
        time.sleep(0.2)


def test_two_replicas_are_summed_on_demand_and_at_shutdown_with_no_text(tiny_artifacts):
    server = ServerHandle(tiny_artifacts, "--workers", "2")
    prompts = [f"{WORD} " * (3 + i) for i in range(16)]
    try:
        wait_for_replicas(server, 2)

        def complete(prompt: str) -> int:
            body = {"model": server.model, "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
            response = requests.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
            response.raise_for_status()
            return response.json()["usage"]["prompt_tokens"]

        with ThreadPoolExecutor(8) as pool:
            prompt_tokens = list(pool.map(complete, prompts))
        served = requests.post(f"{server.base_url}/admin/traffic", timeout=30)
        assert served.status_code == 200, served.text
        assert served.json()["requests"] == len(prompts)
        on_demand = TrafficProfile.read(served.json()["path"])
    finally:
        server.stop()
    at_exit = [p for p in (server.profile_dir / server.model).glob("traffic-*.json") if str(p) != served.json()["path"]]
    assert at_exit, "SIGTERM writes the profile at shutdown: " + server.logs()
    for profile in (on_demand, TrafficProfile.read(at_exit[-1])):
        assert set(HISTOGRAMS) < set(profile.histograms)
        assert profile.histograms[TTFT].observations == len(prompts)
        assert profile.graphs and all(0 < real <= padded for real, padded in profile.graphs.values())
        prompts_seen = profile.histograms["request_prompt_tokens"]
        assert prompts_seen.observations == len(prompts) and prompts_seen.total == sum(prompt_tokens)
        assert profile.histograms["request_generation_tokens"].by_length() == {16: len(prompts)}  # 4 tokens each
        assert profile.histograms["engine_step_running"].observations > 0
    for path in (server.profile_dir / server.model).glob("*.json"):
        assert WORD not in path.read_text()
