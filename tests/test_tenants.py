"""Tenants sharing one server: keys by digest, models, rate limits with OpenAI's headers, metering."""

from __future__ import annotations

import hashlib
import json

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from neuron_serve.server.tenants import Quotas, Tenant, load_tenants


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


TENANTS = f"""
[[tenant]]
name = "alpha"
key_sha256 = "{digest("alpha-key")}"
requests_per_minute = 3

[[tenant]]
name = "beta"
key_sha256 = "{digest("beta-key")}"
models = ["some-other-model"]

[[tenant]]
name = "gamma"
key_sha256 = "{digest("gamma-key")}"
weight = 2.5
"""


def test_a_tenants_file_is_checked_field_by_field(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS)
    tenants = load_tenants(path)
    assert {t.name for t in tenants.values()} == {"alpha", "beta", "gamma"}
    assert tenants[digest("gamma-key")].weight == 2.5 and not tenants[digest("beta-key")].may_use("tiny-cpu")
    path.write_text(
        '[[tenant]]\nname = ""\nkey_sha256 = "plain-key"\nrequests_per_minute = -1\nweight = 0\ncolour = "red"\n'
    )
    with pytest.raises(ValueError) as error:
        load_tenants(path)
    message = str(error.value)
    for field in ("tenant[0].colour", "tenant[0].name", "tenant[0].key_sha256", "requests_per_minute", "weight"):
        assert field in message


def test_quotas_count_requests_tokens_and_streams_over_a_minute():
    quotas = Quotas(replicas=2)  # each of 2 workers enforces half, rounded up
    tenant = Tenant("t", "0" * 64, requests_per_minute=4, tokens_per_minute=100, max_streams=4)
    assert quotas.admit(tenant, now=0.0)[0] == ""
    quotas.release(tenant, tokens=10, now=0.0)
    why, wait, headers = quotas.admit(tenant, now=1.0)
    assert why == "" and headers["x-ratelimit-remaining-requests"] == "0"
    why, wait, _ = quotas.admit(tenant, now=2.0)
    assert why == "2 requests per minute" and wait == pytest.approx(58.0)
    assert quotas.admit(tenant, now=60.5)[0] == ""  # the first admission left the window
    quotas.release(tenant, tokens=60, now=61.0)
    why, _, headers = quotas.admit(tenant, now=61.5)
    assert why == "50 tokens per minute" and headers["x-ratelimit-remaining-tokens"] == "0"


def post(server, key: str, body: dict | None = None, route: str = "/v1/completions") -> requests.Response:
    body = body or {"model": server.model, "prompt": "hello there", "max_tokens": 3, "ignore_eos": True}
    return requests.post(f"{server.base_url}{route}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_usage_splits_the_instances_cost_by_tokens(tmp_path, capsys):
    from neuron_serve.cli import main

    log = tmp_path / "usage.jsonl"
    records = [
        {"time": 1000.0, "tenant": "a", "prompt_tokens": 100, "completion_tokens": 200},
        {"time": 2800.0, "tenant": "b", "prompt_tokens": 50, "completion_tokens": 50},
        {"time": 4600.0, "tenant": "a", "prompt_tokens": 100, "completion_tokens": 150},
    ]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    assert main(["usage", str(log), "--instance", "inf2.xlarge", "--usd-per-hour", "2.0"]) == 0
    out = capsys.readouterr().out
    # One hour at $2.00: a used 550 of 650 tokens, b 100.
    assert "1.00 h at $2.00/h = $2.00" in out
    assert "| a | 2 | 200 | 350 | 84.6% | 1.6923 |" in out and "| b | 1 | 50 | 50 | 15.4% | 0.3077 |" in out
    assert "skipped 1 line(s) that were not usage records" in out


def test_tenants_get_their_models_their_limits_and_their_meters(tiny_artifacts, tmp_path):
    from server_handle import ServerHandle

    (tmp_path / "tenants.toml").write_text(TENANTS)
    usage_log = tmp_path / "usage.jsonl"
    server = ServerHandle(tiny_artifacts, "--tenants", str(tmp_path / "tenants.toml"), "--usage-log", str(usage_log))
    try:
        assert post(server, "nobody").status_code == 401
        first = [post(server, "alpha-key") for _ in range(3)]
        assert [r.status_code for r in first] == [200, 200, 200]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in first] == ["2", "1", "0"]
        over = post(server, "alpha-key")
        assert over.status_code == 429 and over.json()["error"]["type"] == "rate_limit_exceeded"
        assert "3 requests per minute" in over.json()["error"]["message"]
        assert 1 <= int(over.headers["Retry-After"]) <= 60 and over.headers["x-ratelimit-limit-requests"] == "3"
        assert post(server, "gamma-key").status_code == 200  # another tenant is not held by alpha's limit
        denied = post(server, "beta-key")
        assert denied.status_code == 403 and "may not use the model" in denied.json()["error"]["message"]
        models = requests.get(f"{server.base_url}/v1/models", headers={"Authorization": "Bearer beta-key"}, timeout=10)
        assert models.json()["data"] == []
        metrics = requests.get(f"{server.base_url}/metrics", headers={"Authorization": "Bearer gamma-key"}, timeout=10)
        prompt = sum(r.json()["usage"]["prompt_tokens"] for r in first)
        samples = {
            (s.name, s.labels.get("tenant"), s.labels.get("status")): s.value
            for family in text_string_to_metric_families(metrics.text)
            for s in family.samples
        }
        assert samples[("neuron_serve:tenant_prompt_tokens_total", "alpha", None)] == prompt
        assert samples[("neuron_serve:tenant_completion_tokens_total", "alpha", None)] == 9
        assert samples[("neuron_serve:tenant_requests_total", "alpha", "200")] == 3
        assert samples[("neuron_serve:tenant_requests_total", "alpha", "429")] == 1
        assert samples[("neuron_serve:tenant_requests_total", "beta", "403")] == 1
        assert "alpha-key" not in metrics.text
        records = [json.loads(line) for line in usage_log.read_text().splitlines()]
        alpha = [r for r in records if r["tenant"] == "alpha"]
        assert len(alpha) == 3 and sum(r["prompt_tokens"] for r in alpha) == prompt
        assert all("prompt" not in r and r["completion_tokens"] == 3 for r in alpha)
        assert "alpha-key" not in server.logs() and "alpha-key" not in usage_log.read_text()
    finally:
        server.stop()
