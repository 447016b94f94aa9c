"""Serving metrics with vLLM's definitions and JSON key names (``vllm bench serve``).

Per request: TTFT (to the first chunk with text), TPOT = (E2EL - TTFT) / (output tokens - 1) for requests
with more than one output token, ITL (the gaps between text chunks, pooled over all requests), E2EL (to
the last text chunk). Each is summarized as ``mean_<m>_ms``, ``median_<m>_ms``, ``std_<m>_ms`` and
``p<P>_<m>_ms`` (numpy's linear percentile; P printed without ``.0``: p99, p99.9). Throughputs divide by
the level's wall time; goodput counts the requests that meet every SLO (a request with one output token
counts TPOT as 0, as vLLM does). Output token counts come from the server's usage numbers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neuron_serve.bench.client import RequestRecord

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class MetricsConfig:
    percentiles: tuple[float, ...] = (90.0, 99.0)
    percentile_metrics: tuple[str, ...] = PERCENTILE_METRICS
    goodput: dict[str, float] = field(default_factory=dict)  # SLO name -> limit in ms, e.g. {"ttft": 500}


def percentile_word(p: float) -> str:
    """vLLM's spelling of a percentile in key names: 99 -> "99", 99.9 -> "99.9"."""
    return str(int(p)) if int(p) == p else str(p)


def summarize(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float | None]:
    """Mean, median, std and percentiles of ``values_s`` (seconds), in milliseconds, under vLLM's keys.
    No values (every request failed) gives None rather than a misleading 0."""
    values = np.asarray(values_s, dtype=float) * 1000.0
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"]
    keys += [f"p{percentile_word(p)}_{name}_ms" for p in percentiles]
    if values.size == 0:
        return dict.fromkeys(keys)
    stats = [np.mean(values), np.median(values), np.std(values)]
    stats += [np.percentile(values, p) for p in percentiles]
    return {k: float(v) for k, v in zip(keys, stats, strict=True)}


def tpot(rec: RequestRecord) -> float | None:
    """Time per output token after the first, in seconds; None for fewer than two output tokens."""
    if not rec.output_tokens or rec.output_tokens < 2:
        return None
    return (rec.latency - rec.ttft) / (rec.output_tokens - 1)


def meets_slos(rec: RequestRecord, slos_ms: dict[str, float]) -> bool:
    measured = {"ttft": rec.ttft, "tpot": tpot(rec) or 0.0, "e2el": rec.latency}
    return all(measured[name] <= limit / 1000.0 for name, limit in slos_ms.items())


def token_times(rec: RequestRecord) -> np.ndarray:
    """When each text chunk arrived (perf_counter seconds)."""
    return rec.start_time + rec.ttft + np.concatenate([[0.0], np.cumsum(rec.itl)])


def peak_output_tokens_per_s(ok: Sequence[RequestRecord]) -> float:
    """The most text chunks that arrived within one whole second counted from the first request's start
    (vLLM's ``max_output_tokens_per_s``: a chunk counts as one token)."""
    if not ok:
        return 0.0
    t0 = min(r.start_time for r in ok)
    times = np.concatenate([token_times(r) for r in ok]) - t0
    return float(np.bincount(times.astype(int)).max())


def max_concurrent_requests(ok: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once, over the half-open intervals [start, start + E2EL)."""
    events = sorted([(r.start_time, 1) for r in ok] + [(r.start_time + r.latency, -1) for r in ok])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def error_types(records: Sequence[RequestRecord]) -> dict[str, int]:
    return dict(Counter(r.error_type for r in records if not r.success).most_common())


def calculate_metrics(records: Sequence[RequestRecord], duration_s: float, cfg: MetricsConfig) -> dict[str, Any]:
    """The metrics of one load level, keyed as in vLLM's result JSON, plus ``error_types``."""
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len or 0 for r in ok)
    total_out = sum(r.output_tokens or 0 for r in ok)
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": (sum(meets_slos(r, cfg.goodput) for r in ok) / duration_s if cfg.goodput else None),
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
        "max_output_tokens_per_s": peak_output_tokens_per_s(ok),
        "max_concurrent_requests": max_concurrent_requests(ok),
        "error_types": error_types(records),
    }
    per_metric = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for r in ok if (t := tpot(r)) is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name in cfg.percentile_metrics:
        result.update(summarize(name, per_metric[name], cfg.percentiles))
    return result
