"""Benchmark metrics: vLLM's definitions and key names, checked on hand-built request records."""

from __future__ import annotations

import numpy as np
import pytest

from neuron_serve.bench.client import RequestRecord
from neuron_serve.bench.metrics import (
    MetricsConfig,
    calculate_metrics,
    max_concurrent_requests,
    meets_slos,
    peak_output_tokens_per_s,
    percentile_word,
    summarize,
    tpot,
)


def record(
    ttft: float,
    itl: list[float],
    output_tokens: int | None = None,
    start: float = 0.0,
    prompt_len: int = 10,
    error_type: str = "",
) -> RequestRecord:
    rec = RequestRecord(index=0, expected_prompt_len=prompt_len, max_tokens=16, prompt_len=prompt_len)
    rec.start_time, rec.ttft, rec.itl = start, ttft, list(itl)
    rec.latency = ttft + sum(itl)
    rec.output_tokens = len(itl) + 1 if output_tokens is None else output_tokens
    rec.success = not error_type
    rec.error_type = error_type
    return rec


def test_summarize_matches_numpy_on_random_data():
    values = np.random.default_rng(0).lognormal(mean=-3, sigma=1, size=1001)
    pcts = (50.0, 90.0, 99.0, 99.9)
    got = summarize("ttft", values.tolist(), pcts)
    ms = values * 1000
    assert got["mean_ttft_ms"] == pytest.approx(np.mean(ms))
    assert got["median_ttft_ms"] == pytest.approx(np.median(ms))
    assert got["std_ttft_ms"] == pytest.approx(np.std(ms))
    for p in pcts:
        assert got[f"p{percentile_word(p)}_ttft_ms"] == pytest.approx(np.percentile(ms, p))
    assert set(got) == {
        "mean_ttft_ms",
        "median_ttft_ms",
        "std_ttft_ms",
        "p50_ttft_ms",
        "p90_ttft_ms",
        "p99_ttft_ms",
        "p99.9_ttft_ms",
    }


def test_summarize_known_values_in_milliseconds():
    # Seconds in, milliseconds out; linear interpolation: p90 of 1..4 is 3 + 0.7 * (4 - 3).
    got = summarize("itl", [1.0, 2.0, 3.0, 4.0], (90.0, 99.0))
    assert got["mean_itl_ms"] == pytest.approx(2500.0)
    assert got["median_itl_ms"] == pytest.approx(2500.0)
    assert got["p90_itl_ms"] == pytest.approx(3700.0)
    assert got["p99_itl_ms"] == pytest.approx(3970.0)


def test_summarize_without_values_is_none_not_zero():
    assert summarize("tpot", [], (99.0,)) == {
        "mean_tpot_ms": None,
        "median_tpot_ms": None,
        "std_tpot_ms": None,
        "p99_tpot_ms": None,
    }


def test_percentile_word_follows_vllm():
    assert [percentile_word(p) for p in (90.0, 99.0, 99.9, 50)] == ["90", "99", "99.9", "50"]


def test_tpot_excludes_the_first_token():
    rec = record(ttft=0.2, itl=[0.1, 0.1, 0.1, 0.1])  # 5 tokens, E2EL 0.6
    assert tpot(rec) == pytest.approx((0.6 - 0.2) / 4)
    # Usage counts rule, not chunks: 9 tokens in 5 chunks.
    assert tpot(record(ttft=0.2, itl=[0.1] * 4, output_tokens=9)) == pytest.approx(0.4 / 8)
    assert tpot(record(ttft=0.2, itl=[], output_tokens=1)) is None


def test_itl_is_pooled_over_requests_and_failures_are_left_out():
    recs = [
        record(ttft=0.1, itl=[0.01, 0.03]),
        record(ttft=0.3, itl=[0.02]),
        record(ttft=0.0, itl=[], output_tokens=0, error_type="HTTP 400"),
    ]
    m = calculate_metrics(recs, duration_s=2.0, cfg=MetricsConfig(percentiles=(50.0,)))
    assert m["mean_itl_ms"] == pytest.approx(20.0)  # mean of 10, 30, 20: not a mean of means
    assert m["median_itl_ms"] == pytest.approx(20.0)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_e2el_ms"] == pytest.approx((140 + 320) / 2)
    tpots = [(0.14 - 0.1) / 2, (0.32 - 0.3) / 1]
    assert m["mean_tpot_ms"] == pytest.approx(np.mean(tpots) * 1000)
    assert (m["completed"], m["failed"], m["error_types"]) == (2, 1, {"HTTP 400": 1})


def test_throughputs_and_token_totals():
    recs = [record(0.1, [0.1] * 4, prompt_len=16), record(0.1, [0.1] * 9, prompt_len=32)]
    m = calculate_metrics(recs, duration_s=4.0, cfg=MetricsConfig())
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (48, 15)
    assert m["request_throughput"] == pytest.approx(0.5)
    assert m["output_throughput"] == pytest.approx(15 / 4)
    assert m["total_token_throughput"] == pytest.approx(63 / 4)
    assert m["request_goodput"] is None  # no SLOs given
    assert m["duration"] == 4.0


def test_goodput_counts_requests_meeting_every_slo():
    slos = {"ttft": 500.0, "tpot": 50.0}
    good = record(ttft=0.4, itl=[0.04] * 4)
    slow_first = record(ttft=0.6, itl=[0.01] * 4)
    slow_stream = record(ttft=0.1, itl=[0.06] * 4)
    single_token = record(ttft=0.45, itl=[], output_tokens=1)  # TPOT counts as 0, as in vLLM
    at_limit = record(ttft=0.5, itl=[0.05] * 2)
    assert [meets_slos(r, slos) for r in (good, slow_first, slow_stream, single_token, at_limit)] == [
        True,
        False,
        False,
        True,
        True,
    ]
    m = calculate_metrics([good, slow_first, slow_stream, single_token], 2.0, MetricsConfig(goodput=slos))
    assert m["request_goodput"] == pytest.approx(2 / 2.0)
    assert meets_slos(record(ttft=0.1, itl=[0.5]), {"e2el": 500.0}) is False


def test_max_concurrent_requests_uses_half_open_intervals():
    recs = [record(0.1, [0.9], start=0.0), record(0.1, [0.9], start=0.5), record(0.1, [0.9], start=1.0)]
    assert max_concurrent_requests(recs) == 2  # the third starts exactly when the first ends
    assert max_concurrent_requests([]) == 0


def test_peak_output_tokens_per_second_buckets_chunks_by_whole_seconds():
    # Chunks at 0.5, 0.7, 0.9 and 1.1 s, and at 1.2, 1.3, 1.4 s: 3 in the first second, 4 in the second.
    a = record(ttft=0.5, itl=[0.2, 0.2, 0.2], start=0.0)
    b = record(ttft=0.2, itl=[0.1, 0.1], start=1.0)
    assert peak_output_tokens_per_s([a, b]) == 4.0
    assert peak_output_tokens_per_s([]) == 0.0


def test_selected_percentile_metrics_only():
    m = calculate_metrics([record(0.1, [0.1])], 1.0, MetricsConfig((99.0,), ("ttft", "e2el")))
    assert "p99_ttft_ms" in m and "p99_e2el_ms" in m
    assert not any(k.endswith("_tpot_ms") or k.endswith("_itl_ms") for k in m)


def test_all_failed_level_has_no_latency_numbers():
    m = calculate_metrics([record(0, [], 0, error_type="ReadTimeout")], 1.0, MetricsConfig())
    assert m["completed"] == 0 and m["failed"] == 1
    assert m["mean_ttft_ms"] is None and m["max_output_tokens_per_s"] == 0.0
