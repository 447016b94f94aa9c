"""``neuron-serve bench`` against our real server on the tiny model.

Checks that a short sweep writes every file, that its token counts are the server's own (usage numbers
and the Prometheus counters), that prompts have exactly the asked-for length, and that a request the
server rejects is counted as an error rather than ending the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import pytest
import requests

from neuron_serve.bench.cli import add_bench_parser

FILES = (
    "results.json",
    "requests.csv",
    "report.md",
    "throughput.png",
    "ttft_itl_percentiles.png",
    "latency_vs_throughput.png",
)
_SAMPLE = re.compile(r"^(?P<name>[\w:]+)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")


@pytest.fixture(scope="module")
def server(request):
    try:
        return request.getfixturevalue("tiny_server")
    except pytest.FixtureLookupError:
        pytest.skip("needs the tiny_server fixture of tests/conftest.py (the real server on the tiny model)")


def counters(server) -> dict[str, float]:
    """The server's token counters for its model, from GET /metrics."""
    text = requests.get(f"{server.base_url}/metrics", timeout=30).text
    totals = {"prompt": 0.0, "generation": 0.0}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or f'model_name="{server.model}"' not in (m["labels"] or ""):
            continue
        for kind in totals:
            if m["name"] == f"neuron_serve:{kind}_tokens_total":
                totals[kind] += float(m["value"])
    return totals


def bench(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="neuron-serve")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--no-progress", *argv])
    return args.func(args)


def levels_of(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["levels"]


def test_sweep_counts_agree_with_the_server(server, tmp_path):
    out = tmp_path / "sweep"
    before = counters(server)
    rc = bench(
        "--base-url",
        server.base_url,
        "--model",
        server.model,
        "--tokenizer",
        str(server.artifacts / "tokenizer"),
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--concurrency",
        "1,2",
        "--num-prompts",
        "4",
        "--goodput",
        "ttft:60000",
        "--instance",
        "inf2.xlarge",
        "--output",
        str(out),
    )
    after = counters(server)
    assert rc == 0
    for name in FILES:
        assert (out / name).is_file(), name
    levels = levels_of(out)
    assert [(lv["level"], lv["completed"], lv["failed"]) for lv in levels] == [("c1", 4, 0), ("c2", 4, 0)]
    assert sum(lv["total_input_tokens"] for lv in levels) == after["prompt"] - before["prompt"]
    assert sum(lv["total_output_tokens"] for lv in levels) == after["generation"] - before["generation"]
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert {(r["prompt_len"], r["output_tokens"], r["output_tokens_source"]) for r in rows} == {("16", "8", "usage")}
    assert all(lv["usd_per_1m_output_tokens"] > 0 and lv["mean_ttft_ms"] > 0 for lv in levels)


def test_server_tokenizer_and_chat_endpoint(server, tmp_path):
    """Without --tokenizer the prompts are built with the server's /tokenize and /detokenize."""
    out = tmp_path / "chat"
    before = counters(server)
    rc = bench(
        "--base-url",
        f"{server.base_url}/v1",
        "--model",
        server.model,
        "--endpoint",
        "chat",
        "--input-len",
        "24",
        "--output-len",
        "6",
        "--concurrency",
        "2",
        "--num-prompts",
        "3",
        "--output",
        str(out),
    )
    after = counters(server)
    assert rc == 0
    (level,) = levels_of(out)
    assert (level["completed"], level["failed"], level["total_output_tokens"]) == (3, 0, 18)
    assert level["total_input_tokens"] == after["prompt"] - before["prompt"]
    assert level["total_output_tokens"] == after["generation"] - before["generation"]


def test_rejected_request_is_counted_not_fatal(server, tmp_path):
    dataset = tmp_path / "prompts.jsonl"
    prompts = ["The quick brown fox.", "word " * 400, "Tell me about the sea."]  # the second is > 128 tokens
    dataset.write_text("".join(json.dumps({"prompt": p, "output_len": 4}) + "\n" for p in prompts))
    out = tmp_path / "errors"
    rc = bench(
        "--base-url",
        server.base_url,
        "--model",
        server.model,
        "--tokenizer",
        str(server.artifacts / "tokenizer"),
        "--dataset",
        str(dataset),
        "--concurrency",
        "1,2",
        "--output",
        str(out),
    )
    assert rc == 0
    for name in FILES:
        assert (out / name).is_file(), name
    for level in levels_of(out):
        assert (level["completed"], level["failed"], level["error_types"]) == (2, 1, {"HTTP 400": 1})
        assert level["total_output_tokens"] == 8
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert sum(r["error_type"] == "HTTP 400" for r in rows) == 2
