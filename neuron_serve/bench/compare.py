"""``neuron-serve bench compare RUN_A RUN_B``: two runs side by side, level by level.

Levels are matched by their key (``c8`` for concurrency 8, ``r2.5`` for 2.5 req/s), so a before/after
pair of the same sweep lines up row for row; a level that only one run has shows "–" for the other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from neuron_serve.bench.report import fmt, load_results

# (key, title, decimals)
_THROUGHPUT_ROWS = [
    ("completed", "completed", 0),
    ("failed", "failed", 0),
    ("request_throughput", "req/s", 2),
    ("output_throughput", "output tok/s", 1),
    ("total_token_throughput", "total tok/s", 1),
    ("max_output_tokens_per_s", "peak output tok/s", 0),
    ("request_goodput", "goodput req/s", 2),
]
_COST_ROWS = [("usd_per_1m_output_tokens", "USD / 1M output tok", 4), ("usd_per_10k_requests", "USD / 10k req", 4)]
_LATENCY_KEY = re.compile(r"^(mean|median|p([0-9.]+))_(ttft|tpot|itl|e2el)_ms$")
_METRIC_ORDER = ("ttft", "tpot", "itl", "e2el")


def _latency_rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, int]]:
    """The latency keys either level has, grouped by metric: mean, median, then percentiles ascending."""
    keys = {k for k in (*a, *b) if _LATENCY_KEY.match(k)}

    def order(key: str) -> tuple[int, float]:
        stat, pct, metric = _LATENCY_KEY.match(key).groups()
        rank = {"mean": -2.0, "median": -1.0}.get(stat, float(pct or 0))
        return _METRIC_ORDER.index(metric), rank

    return [(k, f"{k.split('_')[0]} {k.split('_')[1].upper()} ms", 2) for k in sorted(keys, key=order)]


def _change(a: Any, b: Any) -> str:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or a == 0:
        return ""
    return f"{(b - a) / abs(a) * 100:+.1f}%"


def _level_block(label: str, a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    rows = _THROUGHPUT_ROWS + _latency_rows(a, b) + _COST_ROWS
    lines = [label, f"  {'metric':<24}{'A':>14}{'B':>14}{'B vs A':>10}"]
    for key, title, digits in rows:
        va, vb = a.get(key), b.get(key)
        if va is None and vb is None:
            continue
        lines.append(f"  {title:<24}{fmt(va, digits):>14}{fmt(vb, digits):>14}{_change(va, vb):>10}")
    return lines


def _describe(name: str, run: dict[str, Any]) -> str:
    inst = run.get("instance")
    where = f", {inst['name']} with {inst['replicas']} replica(s)" if inst else ""
    return f"{name}: {run.get('model_id')} at {run.get('base_url')} ({run.get('date')}; {run.get('workload')}{where})"


def compare_runs(path_a: str | Path, path_b: str | Path) -> str:
    """The side-by-side table of two run directories (or their results.json files)."""
    run_a, run_b = load_results(path_a), load_results(path_b)
    by_key_a = {lv["level"]: lv for lv in run_a["levels"]}
    by_key_b = {lv["level"]: lv for lv in run_b["levels"]}
    keys = list(by_key_a) + [k for k in by_key_b if k not in by_key_a]
    lines = [_describe(f"A = {path_a}", run_a), _describe(f"B = {path_b}", run_b), ""]
    for key in keys:
        a, b = by_key_a.get(key, {}), by_key_b.get(key, {})
        label = (a or b)["level_label"]
        lines += [*_level_block(label, a, b), ""]
    return "\n".join(lines)
