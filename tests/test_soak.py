"""A soak of the shared server (slow suite): 10,000 requests at concurrency 64 from three tenants, over
every generation route, streaming and not, with clients that leave mid-stream and hostile inputs. No
stream may be lost or garbled, the worker's and the forward process's memory must stay bounded, and
each tenant's meters must equal what it was answered.

    python -m pytest -m slow tests/test_soak.py -s     # prints the figures
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import tiny_recipe
from prometheus_client.parser import text_string_to_metric_families
from server_handle import ServerHandle

from neuron_serve.compiler.compile import compile_recipe

pytestmark = pytest.mark.slow

REQUESTS, CONCURRENCY = 10_000, 64
TENANTS = {"red": "red-key", "green": "green-key", "leaver": "leaver-key"}  # leaver's clients disconnect


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def server_pids(root: int) -> list[int]:
    """The server's worker and forward processes: every descendant of the gunicorn master."""
    children, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                children.append(int(child))
                frontier.append(int(child))
    return children


def one_request(server: ServerHandle, i: int, rng: random.Random) -> tuple[str, str, dict | None]:
    """(tenant, outcome, usage): outcome is ok, refused (a 4xx the request earned), left or broken."""
    tenant = rng.choice(["red", "green", "leaver"])
    headers = {"Authorization": f"Bearer {TENANTS[tenant]}"}
    url, kind = server.base_url, rng.random()
    max_tokens = rng.randint(1, 12)
    if kind < 0.05:
        body = {"model": server.model, "prompt": "word " * 100_000, "max_tokens": 4}  # too long: 400
        r = requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
        return tenant, "refused" if r.status_code == 400 else "broken", None
    if kind < 0.1:
        parameters = {"max_new_tokens": max_tokens, "ignore_eos": True, "details": True}
        r = requests.post(
            f"{url}/invocations", json={"inputs": f"soak {i}", "parameters": parameters}, headers=headers, timeout=120
        )
        if r.status_code != 200 or r.json()["details"]["generated_tokens"] != max_tokens:
            return tenant, "broken", None
        details = r.json()["details"]
        return tenant, "ok", {"prompt_tokens": details["prompt_tokens"], "completion_tokens": max_tokens}
    chat = kind < 0.4
    body = {"model": server.model, "max_tokens": max_tokens, "ignore_eos": True, "stream": kind >= 0.25}
    body |= {"messages": [{"role": "user", "content": f"soak {i}"}]} if chat else {"prompt": f"soak {i}"}
    body |= {"stream_options": {"include_usage": True}} if body["stream"] else {}
    route = "/v1/chat/completions" if chat else "/v1/completions"
    with requests.post(f"{url}{route}", json=body, headers=headers, stream=body["stream"], timeout=120) as r:
        if r.status_code != 200:
            return tenant, "broken", None
        if not body["stream"]:
            usage = r.json()["usage"]
            return tenant, "ok" if usage["completion_tokens"] == max_tokens else "broken", usage
        lines = r.iter_lines(decode_unicode=True)
        if tenant == "leaver":
            next(lines)
            return tenant, "left", None
        events = [line for line in lines if line]
    if events[-1] != "data: [DONE]":
        return tenant, "broken", None
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    usage = chunks[-1]["usage"]
    return tenant, "ok" if usage["completion_tokens"] == max_tokens else "broken", usage


def meters(server: ServerHandle) -> dict[tuple[str, str], float]:
    text = requests.get(f"{server.base_url}/metrics", headers={"Authorization": "Bearer red-key"}, timeout=30).text
    return {
        (s.name, s.labels["tenant"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("neuron_serve:tenant_") and s.name.endswith("tokens_total")
    }


def test_ten_thousand_requests_from_three_tenants(tmp_path):
    recipe = tiny_recipe(**{"shapes.batch_size": 16, "serve.max_waiting": 256})
    artifacts = compile_recipe(recipe, tmp_path / "tiny-cpu").out_dir
    lines = [
        f'[[tenant]]\nname = "{name}"\nkey_sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
        for name, key in TENANTS.items()
    ]
    (tmp_path / "tenants.toml").write_text("\n".join(lines))
    server = ServerHandle(artifacts, "--tenants", str(tmp_path / "tenants.toml"))
    try:
        pids = server_pids(server.process.pid)
        before = {pid: rss_mb(pid) for pid in pids}
        rng_lock, rng = threading.Lock(), random.Random(0)

        def run(i):
            with rng_lock:
                local = random.Random(rng.random())
            return one_request(server, i, local)

        started = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(run, range(REQUESTS)))
        seconds = time.perf_counter() - started
        after = {pid: rss_mb(pid) for pid in pids}
        outcomes = Counter(outcome for _, outcome, _ in results)
        print(f"\n{REQUESTS} requests in {seconds:.0f} s: {dict(outcomes)}; RSS MB before {before}, after {after}")
        assert outcomes["broken"] == 0 and sum(outcomes.values()) == REQUESTS
        for pid in pids:
            assert after[pid] < before[pid] * 1.5 + 200, f"process {pid} grew from {before[pid]} to {after[pid]} MB"
        time.sleep(1)  # the last streams' meters
        metered = meters(server)
        for tenant in ("red", "green"):  # the leaver's meters count the tokens its gone clients never read
            answered = [usage for who, outcome, usage in results if who == tenant and usage]
            for kind in ("prompt", "completion"):
                sent = sum(u[f"{kind}_tokens"] for u in answered)
                assert metered[(f"neuron_serve:tenant_{kind}_tokens_total", tenant)] == sent, (tenant, kind)
        still = requests.post(
            f"{server.base_url}/v1/completions",
            json={"model": server.model, "prompt": "still", "max_tokens": 3, "ignore_eos": True},
            headers={"Authorization": "Bearer green-key"},
            timeout=60,
        )
        assert still.json()["usage"]["completion_tokens"] == 3
    finally:
        server.stop()
