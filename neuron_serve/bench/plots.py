"""PNG plots of a run, drawn from its per-level results (so a saved results.json can be re-plotted).

``matplotlib.figure.Figure`` is used directly, not pyplot: no global state, no GUI backend to pick, safe
on a headless machine.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

THROUGHPUT_PNG = "throughput.png"
PERCENTILES_PNG = "ttft_itl_percentiles.png"
LATENCY_THROUGHPUT_PNG = "latency_vs_throughput.png"
_PERCENTILE_KEY = re.compile(r"^p([0-9.]+)_(\w+)_ms$")


def _closed_loop(levels: list[dict[str, Any]]) -> bool:
    return all(lv["request_rate"] == "inf" for lv in levels)


def _x(levels: list[dict[str, Any]]) -> tuple[list[float], str]:
    if _closed_loop(levels):
        return [float(lv["max_concurrency"]) for lv in levels], "concurrency (requests in flight)"
    return [float(lv["request_rate"]) for lv in levels], "request rate (req/s)"


def _values(levels: list[dict[str, Any]], key: str) -> list[float]:
    return [math.nan if lv.get(key) is None else float(lv[key]) for lv in levels]


def _percentile_keys(levels: list[dict[str, Any]], metric: str) -> list[str]:
    """The ``p<P>_<metric>_ms`` keys present, highest percentile last."""
    found = {k for lv in levels for k in lv if (m := _PERCENTILE_KEY.match(k)) and m.group(2) == metric}
    return sorted(found, key=lambda k: float(_PERCENTILE_KEY.match(k).group(1)))


def _style_x(ax: Axes, levels: list[dict[str, Any]], xs: list[float], label: str) -> None:
    if _closed_loop(levels) and len(xs) > 2 and min(xs) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)


def plot_throughput(levels: list[dict[str, Any]], path: Path) -> Path:
    xs, xlabel = _x(levels)
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    ax.plot(xs, _values(levels, "output_throughput"), "o-", label="output tok/s")
    ax.plot(xs, _values(levels, "total_token_throughput"), "s--", label="total tok/s")
    ax.plot(xs, _values(levels, "max_output_tokens_per_s"), "^:", label="peak output tok/s")
    ax.set_ylabel("tokens/s")
    _style_x(ax, levels, xs, xlabel)
    right = ax.twinx()
    right.plot(xs, _values(levels, "request_throughput"), "d-", color="tab:red", label="req/s")
    right.set_ylabel("requests/s")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left")
    ax.set_title("Throughput")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def plot_percentiles(levels: list[dict[str, Any]], path: Path) -> Path:
    """TTFT and ITL: median and each percentile against the load."""
    xs, xlabel = _x(levels)
    fig = Figure(figsize=(12, 5))
    for i, metric in enumerate(("ttft", "itl")):
        ax = fig.add_subplot(1, 2, i + 1)
        for key in [f"median_{metric}_ms", *_percentile_keys(levels, metric)]:
            ax.plot(xs, _values(levels, key), "o-", label=key.split("_")[0])
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.set_title(f"{metric.upper()} percentiles")
        _style_x(ax, levels, xs, xlabel)
        ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def plot_latency_vs_throughput(levels: list[dict[str, Any]], slos_ms: dict[str, float], path: Path) -> Path:
    """TTFT, TPOT and E2EL (median and highest percentile) against output throughput, with the SLOs."""
    xs = _values(levels, "output_throughput")
    fig = Figure(figsize=(15, 5))
    for i, metric in enumerate(("ttft", "tpot", "e2el")):
        ax = fig.add_subplot(1, 3, i + 1)
        for key in [f"median_{metric}_ms", *_percentile_keys(levels, metric)[-1:]]:
            ax.plot(xs, _values(levels, key), "o-", label=key.split("_")[0])
        for x, y, lv in zip(xs, _values(levels, f"median_{metric}_ms"), levels, strict=True):
            if math.isfinite(x) and math.isfinite(y):
                ax.annotate(lv["level"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if metric in slos_ms:
            ax.axhline(slos_ms[metric], color="tab:red", linestyle="--", label=f"SLO {slos_ms[metric]:g} ms")
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.set_title(f"{metric.upper()} vs throughput")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def write_plots(levels: list[dict[str, Any]], out_dir: Path, slos_ms: dict[str, float]) -> list[Path]:
    if not levels:
        return []
    return [
        plot_throughput(levels, out_dir / THROUGHPUT_PNG),
        plot_percentiles(levels, out_dir / PERCENTILES_PNG),
        plot_latency_vs_throughput(levels, slos_ms, out_dir / LATENCY_THROUGHPUT_PNG),
    ]
