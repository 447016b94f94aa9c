"""A benchmark run written from synthetic records: every file, vLLM's keys, and ``bench compare``."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest

from neuron_serve.bench.cli import add_bench_parser, split_base_url
from neuron_serve.bench.client import RequestRecord
from neuron_serve.bench.compare import compare_runs
from neuron_serve.bench.cost import resolve_cost_model
from neuron_serve.bench.metrics import MetricsConfig
from neuron_serve.bench.report import build_run, write_run
from neuron_serve.bench.runner import LevelRun, LoadLevel

VLLM_KEYS = {
    "date",
    "backend",
    "endpoint_type",
    "label",
    "model_id",
    "tokenizer_id",
    "num_prompts",
    "request_rate",
    "burstiness",
    "max_concurrency",
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
    *(f"{s}_{m}_ms" for s in ("mean", "median", "std", "p90", "p99") for m in ("ttft", "tpot", "itl", "e2el")),
}


def synthetic_level(concurrency: int, n: int, speed: float, rng: np.random.Generator) -> LevelRun:
    """``n`` requests of 8 output tokens, ``concurrency`` at a time, one of them an HTTP 400."""
    records = []
    for i in range(n):
        rec = RequestRecord(i, 16, 8, prompt_len=16)
        rec.arrival_time = 100.0
        rec.start_time = 100.0 + (i // concurrency) * 0.5
        if i == n - 1:
            rec.error_type, rec.error = "HTTP 400", "prompt too long"
        else:
            rec.ttft = float(rng.uniform(0.05, 0.2)) * concurrency / speed
            rec.itl = list(rng.uniform(0.01, 0.03, size=7) * concurrency / speed)
            rec.latency = rec.ttft + sum(rec.itl)
            rec.output_tokens, rec.output_tokens_source, rec.success = 8, "usage", True
            rec.generated_text = "x" * 8
        records.append(rec)
    duration = max(r.start_time + r.latency for r in records) - 100.0
    return LevelRun(LoadLevel(concurrency), records, duration, 100.0, cancelled=0, interrupted=False)


def make_run(tmp_path, name: str, speed: float, levels=(1, 2, 4)):
    rng = np.random.default_rng(int(speed * 10))
    runs = [synthetic_level(c, 6, speed, rng) for c in levels]
    cfg = MetricsConfig(goodput={"ttft": 150.0, "tpot": 40.0})
    cost = resolve_cost_model("inf2.xlarge")
    config = {
        "date": "20250101-000000",
        "endpoint_type": "openai",
        "backend": "openai",
        "label": name,
        "model_id": "tiny",
        "tokenizer_id": "tok",
        "num_prompts": 6,
        "base_url": "http://h/v1",
        "workload": "preset qa: 16 input → 8 output tokens",
        "load": "closed loop",
        "ignore_eos": "supported",
        "percentiles": list(cfg.percentiles),
        "percentile_metrics": list(cfg.percentile_metrics),
        "goodput": cfg.goodput,
        "instance": cost.describe(),
        "notes": ["a note"],
        "interrupted": False,
    }
    out = tmp_path / name
    return out, write_run(build_run(config, runs, cfg, cost), out)


def test_run_writes_every_file_with_vllm_keys(tmp_path):
    out, paths = make_run(tmp_path, "before", speed=1.0)
    names = {p.name for p in paths}
    assert names == {
        "results.json",
        "requests.csv",
        "report.md",
        "throughput.png",
        "ttft_itl_percentiles.png",
        "latency_vs_throughput.png",
    }
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    assert results["model_id"] == "tiny" and results["instance"]["name"] == "inf2.xlarge"
    levels = results["levels"]
    assert [lv["level"] for lv in levels] == ["c1", "c2", "c4"]
    for lv in levels:
        assert VLLM_KEYS <= set(lv), VLLM_KEYS - set(lv)
        assert (lv["completed"], lv["failed"], lv["error_types"]) == (5, 1, {"HTTP 400": 1})
        assert (lv["total_input_tokens"], lv["total_output_tokens"]) == (80, 40)
        assert lv["request_rate"] == "inf" and lv["max_concurrency"] == int(lv["level"][1:])
        assert lv["usd_per_1m_output_tokens"] == pytest.approx(0.7582 / (lv["output_throughput"] * 3600) * 1e6)

    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == 18
    assert sum(r["error_type"] == "HTTP 400" for r in rows) == 3
    assert all(len(r["itl_ms"].split(";")) == 7 for r in rows if r["success"] == "True")

    md = (out / "report.md").read_text()
    for text in ("| concurrency 4 |", "### TTFT", "### ITL", "| HTTP 400 | 1 |", "![throughput.png]", "a note"):
        assert text in md


def test_compare_prints_both_runs_side_by_side(tmp_path, capsys):
    a, _ = make_run(tmp_path, "before", speed=1.0)
    b, _ = make_run(tmp_path, "after", speed=2.0, levels=(1, 2, 8))
    text = compare_runs(a, b)
    assert str(a) in text and str(b) in text
    for label in ("concurrency 1", "concurrency 2", "concurrency 4", "concurrency 8"):
        assert label in text
    before = json.loads((a / "results.json").read_text())["levels"][0]
    after = json.loads((b / "results.json").read_text())["levels"][0]
    line = next(s for s in text.splitlines() if s.strip().startswith("median TTFT ms"))
    change = (after["median_ttft_ms"] - before["median_ttft_ms"]) / before["median_ttft_ms"] * 100
    assert f"{before['median_ttft_ms']:.2f}" in line and f"{change:+.1f}%" in line

    # Through the command line, as `neuron-serve bench compare A B`.
    parser = argparse.ArgumentParser(prog="neuron-serve")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "compare", str(a), str(b / "results.json")])
    assert args.func(args) == 0
    assert "USD / 1M output tok" in capsys.readouterr().out
    args = parser.parse_args(["bench", "compare", str(a), str(tmp_path / "missing")])
    assert args.func(args) == 2


def test_bench_arguments():
    parser = argparse.ArgumentParser(prog="neuron-serve")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "bench",
            "--base-url",
            "http://h:8000",
            "--preset",
            "summarization",
            "--concurrency",
            "1,4,16",
            "--goodput",
            "ttft:500",
            "tpot:50",
            "--metric-percentiles",
            "50,99.9",
            "--instance",
            "inf2.xlarge",
            "--output",
            "out",
        ]
    )
    assert args.concurrency == [1, 4, 16] and args.request_rate is None
    assert dict(args.goodput) == {"ttft": 500.0, "tpot": 50.0}
    assert args.metric_percentiles == [50.0, 99.9] and args.ignore_eos and args.bench_command is None
    for bad in (["--goodput", "latency:5"], ["--concurrency", "0,2"], ["--concurrency", "1", "--request-rate", "2"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["bench", *bad])
    assert split_base_url("http://h:8000/v1/") == ("http://h:8000", "http://h:8000/v1")
    assert split_base_url("http://h:8000") == ("http://h:8000", "http://h:8000/v1")
