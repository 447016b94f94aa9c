"""A run's results directory: ``results.json`` (vLLM-style keys), ``requests.csv`` (one row per request),
``report.md`` (tables for people) and the PNG plots.

``results.json`` holds the run's settings at the top and ``levels``: one object per load level with the
keys of a ``vllm bench serve`` result (settings, throughputs, ``mean_/median_/std_/p<P>_<metric>_ms``)
plus ``level`` (e.g. ``c8``), ``level_label``, ``error_types``, ``cancelled``, ``interrupted`` and the
cost keys when an instance was named.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuron_serve.bench.cost import CostModel
from neuron_serve.bench.metrics import MetricsConfig, calculate_metrics, percentile_word, tpot
from neuron_serve.bench.runner import LevelRun

RESULTS_JSON = "results.json"
REQUESTS_CSV = "requests.csv"
REPORT_MD = "report.md"
# The run-wide settings that vLLM repeats in every result file, repeated here in every level.
_VLLM_RUN_KEYS = ("date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts")
_METRIC_TITLES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}


@dataclass
class RunResult:
    config: dict[str, Any]  # run-wide settings, the top of results.json
    levels: list[dict[str, Any]]  # one vLLM-style result per load level
    runs: list[LevelRun]  # the per-request records behind them


def level_result(
    config: dict[str, Any], run: LevelRun, metrics_cfg: MetricsConfig, cost: CostModel | None
) -> dict[str, Any]:
    level = run.level
    result: dict[str, Any] = {k: config.get(k) for k in _VLLM_RUN_KEYS}
    result |= {
        "request_rate": "inf" if level.closed_loop else level.request_rate,
        "burstiness": level.burstiness,
        "max_concurrency": level.max_concurrency,
        "level": level.key,
        "level_label": level.label,
    }
    result |= calculate_metrics(run.records, run.duration_s, metrics_cfg)
    result |= {"cancelled": run.cancelled, "interrupted": run.interrupted}
    if cost is not None:
        result |= cost.level_cost(result)
    return result


def build_run(
    config: dict[str, Any], runs: list[LevelRun], metrics_cfg: MetricsConfig, cost: CostModel | None
) -> RunResult:
    return RunResult(config, [level_result(config, r, metrics_cfg, cost) for r in runs], runs)


def write_run(run: RunResult, out_dir: str | Path) -> list[Path]:
    """Writes every file of the run into ``out_dir`` (created if needed); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps({**run.config, "levels": run.levels}, indent=2) + "\n")
    write_requests_csv(run.runs, out / REQUESTS_CSV)
    # Imported here: matplotlib takes about a second to import, and every `neuron-serve` command
    # (`serve`, and each server replica's forward process) imports this module through the CLI.
    from neuron_serve.bench.plots import write_plots

    plots = write_plots(run.levels, out, run.config.get("goodput") or {})
    (out / REPORT_MD).write_text(markdown_report(run.config, run.levels, [p.name for p in plots]))
    return [out / RESULTS_JSON, out / REQUESTS_CSV, out / REPORT_MD, *plots]


def load_results(path: str | Path) -> dict[str, Any]:
    """A run's results.json, given the run directory or the file itself."""
    p = Path(path)
    return json.loads((p / RESULTS_JSON if p.is_dir() else p).read_text())


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.3f}"


def write_requests_csv(runs: list[LevelRun], path: Path) -> None:
    fields = [
        "level",
        "index",
        "arrival_s",
        "start_s",
        "queue_ms",
        "expected_prompt_len",
        "prompt_len",
        "max_tokens",
        "output_tokens",
        "output_tokens_source",
        "success",
        "ttft_ms",
        "tpot_ms",
        "e2el_ms",
        "itl_ms",
        "error_type",
        "error",
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for run in runs:
            for r in sorted(run.records, key=lambda r: r.index):
                ok = r.success
                writer.writerow(
                    {
                        "level": run.level.key,
                        "index": r.index,
                        "arrival_s": f"{r.arrival_time - run.started_at:.6f}",
                        "start_s": f"{r.start_time - run.started_at:.6f}",
                        "queue_ms": _ms(r.start_time - r.arrival_time),
                        "expected_prompt_len": r.expected_prompt_len,
                        "prompt_len": r.prompt_len,
                        "max_tokens": r.max_tokens,
                        "output_tokens": r.output_tokens,
                        "output_tokens_source": r.output_tokens_source,
                        "success": ok,
                        "ttft_ms": _ms(r.ttft) if ok else "",
                        "tpot_ms": _ms(tpot(r)) if ok else "",
                        "e2el_ms": _ms(r.latency) if ok else "",
                        "itl_ms": ";".join(f"{x * 1000:.3f}" for x in r.itl),
                        "error_type": r.error_type,
                        "error": r.error,
                    }
                )


def fmt(value: Any, digits: int = 2) -> str:
    """A number for a table: thousands separated, ``digits`` decimals for floats, "–" for no value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def throughput_table(levels: list[dict[str, Any]]) -> list[str]:
    header = [
        "load",
        "completed",
        "failed",
        "req/s",
        "output tok/s",
        "total tok/s",
        "peak output tok/s",
        "goodput req/s",
        "USD / 1M output tok",
        "USD / 10k req",
    ]
    rows = [
        [
            lv["level_label"],
            fmt(lv["completed"]),
            fmt(lv["failed"]),
            fmt(lv["request_throughput"]),
            fmt(lv["output_throughput"], 1),
            fmt(lv["total_token_throughput"], 1),
            fmt(lv["max_output_tokens_per_s"], 0),
            fmt(lv["request_goodput"]),
            fmt(lv.get("usd_per_1m_output_tokens"), 4),
            fmt(lv.get("usd_per_10k_requests"), 4),
        ]
        for lv in levels
    ]
    return _table(header, rows)


def latency_table(levels: list[dict[str, Any]], metric: str, percentiles: list[float]) -> list[str]:
    words = [percentile_word(p) for p in percentiles]
    header = ["load", "mean", "median", *[f"p{w}" for w in words]]
    keys = [f"mean_{metric}_ms", f"median_{metric}_ms", *[f"p{w}_{metric}_ms" for w in words]]
    return _table(header, [[lv["level_label"], *[fmt(lv.get(k)) for k in keys]] for lv in levels])


def _errors_section(levels: list[dict[str, Any]]) -> list[str]:
    rows = [[lv["level_label"], kind, str(n)] for lv in levels for kind, n in lv["error_types"].items()]
    return _table(["load", "error type", "count"], rows) if rows else ["None."]


def _setup_lines(config: dict[str, Any]) -> list[str]:
    inst = config.get("instance")
    cost = (
        f"{inst['name']} ({inst['neuron_cores']} NeuronCores, {inst['accelerator_memory_gib']} GiB), "
        f"USD {inst['usd_per_hour']:.4f}/hour ({inst['price_source']}), {inst['replicas']} replica(s) "
        f"on it, {inst['measured_replicas']} measured"
        if inst
        else "no instance named (--instance): no cost figures"
    )
    return [
        f"- Date: {config['date']}; endpoint: {config['base_url']} ({config['endpoint_type']})",
        f"- Workload: {config['workload']}; {config['num_prompts']} requests per level",
        f"- Load: {config['load']}",
        f"- Instance: {cost}",
        *[f"- Note: {note}" for note in config.get("notes", [])],
    ]


def markdown_report(config: dict[str, Any], levels: list[dict[str, Any]], plots: list[str]) -> str:
    lines = [f"# Benchmark of {config['model_id']}", "", *_setup_lines(config), ""]
    if config.get("interrupted"):
        lines += ["**Interrupted (Ctrl-C): the last level holds only the requests that had finished.**", ""]
    lines += ["## Throughput and cost", "", *throughput_table(levels), ""]
    if config.get("goodput"):
        slos = ", ".join(f"{k.upper()} <= {v:g} ms" for k, v in config["goodput"].items())
        lines += [f"Goodput counts the requests that met every SLO: {slos}.", ""]
    lines += ["## Latency (ms)", ""]
    for metric in config["percentile_metrics"]:
        lines += [f"### {_METRIC_TITLES[metric]}", "", *latency_table(levels, metric, config["percentiles"]), ""]
    lines += ["## Errors", "", *_errors_section(levels), "", "## Plots", ""]
    lines += [f"![{name}]({name})" for name in plots]
    lines += ["", "## Definitions", "", _DEFINITIONS]
    return "\n".join(lines) + "\n"


_DEFINITIONS = (
    "As in vLLM's `vllm bench serve`: TTFT is the time from sending a request to its first chunk with "
    "text; TPOT = (E2EL - TTFT) / (output tokens - 1); ITL pools the gaps between successive text chunks "
    "of all requests; E2EL ends at the last text chunk. Throughputs divide by the level's wall time; "
    "peak output tok/s counts chunks within one second. Token counts are the server's usage numbers "
    "(re-tokenized text when a server sends none). Cost = USD per hour / (rate per second x 3600)."
)


def console_summary(levels: list[dict[str, Any]]) -> str:
    """A short text table for the terminal at the end of a run."""
    header = f"{'load':<34}{'ok':>6}{'fail':>6}{'req/s':>9}{'out tok/s':>11}{'TTFT p50':>10}{'TPOT p50':>10}"
    header += f"{'USD/1M out':>12}"
    lines = [header]
    for lv in levels:
        lines.append(
            f"{lv['level_label']:<34}{lv['completed']:>6}{lv['failed']:>6}{fmt(lv['request_throughput']):>9}"
            f"{fmt(lv['output_throughput'], 1):>11}{fmt(lv.get('median_ttft_ms'), 1):>10}"
            f"{fmt(lv.get('median_tpot_ms'), 1):>10}{fmt(lv.get('usd_per_1m_output_tokens'), 3):>12}"
        )
    return "\n".join(lines)
