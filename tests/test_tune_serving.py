"""`tune`'s serving rules: prompt budget, slots, TP degree vs replicas, each judged against the SLO only
where the traffic's histogram bins fall clearly on one side of it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.artifact.traffic import HISTOGRAMS, ITL, QUEUE_TIME, TTFT, Binned, TrafficProfile
from neuron_serve.engine.metrics import LATENCY_BUCKETS
from neuron_serve.recipe.files import load_recipe
from neuron_serve.recipe.validation import recipe_errors
from neuron_serve.tune.serving import (
    Slo,
    judge,
    tune_parallelism,
    tune_prefill_order,
    tune_prompt_budget,
    tune_slots,
)
from neuron_serve.tune.tune import tune

RECIPE = Path(__file__).resolve().parent.parent / "compile" / "smollm2-135m-cpu.toml"
SMOLLM_HEADS = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3)


def binned(bins: tuple, values: list[float]) -> Binned:
    counts = [0] * len(bins)
    for value in values:
        counts[next(i for i, b in enumerate(bins) if value <= b)] += 1
    return Binned(tuple(bins), counts, 0, float(sum(values)))


def traffic(steps=1000, running=8, prompt_share=0.5, ttft=0.5, itl=0.1, queue=0.0, prompt=100) -> TrafficProfile:
    """`steps` engine steps with `running` requests each, a share of them carrying prompt tokens, and
    every request's latencies at the given values."""
    histograms = {name: binned(bins, []) for name, (_, bins) in HISTOGRAMS.items()}
    histograms["engine_step_running"] = binned(HISTOGRAMS["engine_step_running"][1], [running] * steps)
    prompt_steps = int(steps * prompt_share)
    histograms["engine_step_prompt_tokens"] = binned(HISTOGRAMS["engine_step_prompt_tokens"][1], [96] * prompt_steps)
    histograms["request_prompt_tokens"] = binned(HISTOGRAMS["request_prompt_tokens"][1], [prompt] * 200)
    for name, value in ((TTFT, ttft), (ITL, itl), (QUEUE_TIME, queue)):
        histograms[name] = binned(LATENCY_BUCKETS, [value] * 200)
    return TrafficProfile("smollm2-135m-cpu", histograms, "20261130T000000Z")


def test_slo_parses_seconds_and_names_a_bad_part():
    assert Slo.parse("ttft=2,itl=0.2") == Slo(2.0, 0.2) and Slo.parse("itl=0.1") == Slo(None, 0.1)
    for text, problem in (
        ("ttf=1", "the objectives are"),
        ("itl=fast", "'fast' is not a number"),
        ("itl=0", "more than 0"),
    ):
        with pytest.raises(ValueError, match=problem):
            Slo.parse(text)


def test_a_percentile_is_judged_only_when_its_bin_is_clearly_on_one_side():
    h = binned(LATENCY_BUCKETS, [0.3] * 10)  # the (0.25, 0.5] bin
    assert judge(h, 0.5, 0.2, "ITL").verdict == "over"
    assert judge(h, 0.5, 0.5, "ITL").verdict == "within"
    assert judge(h, 0.5, 0.3, "ITL").verdict == "unclear"
    assert judge(h, 0.5, None, "ITL").verdict == "unclear" and "no objective" in judge(h, 0.5, None, "ITL").figure


def test_itl_over_the_objective_with_prompt_chunks_shrinks_the_prompt_budget():
    recipe = load_recipe(RECIPE)
    tuned, change = tune_prompt_budget(recipe, traffic(itl=0.6), Slo(itl_s=0.2))
    # 128 x 0.2 / 0.6 = 42.7, down to a multiple of 16.
    assert (change.before, change.after) == (128, 32) and "ITL p90 in (0.5, 0.75] s" in change.reason
    assert tuned.shapes.context_buckets == [16, 32] and tuned.shapes.token_budget == 32 + 32
    assert not recipe_errors(tuned)


def test_slow_first_tokens_with_itl_to_spare_and_long_prompts_double_the_prompt_budget():
    recipe = load_recipe(RECIPE)
    tuned, change = tune_prompt_budget(recipe, traffic(ttft=3.0, itl=0.05, prompt=900), Slo(ttft_s=1.0, itl_s=0.2))
    assert (change.before, change.after) == (128, 256) and "200 prompts were longer" in change.reason
    assert tuned.shapes.context_buckets == [16, 32, 64, 96, 128, 256] and tuned.shapes.token_budget == 32 + 256
    # Without an objective, the same traffic is no evidence.
    assert not tune_prompt_budget(recipe, traffic(ttft=3.0, itl=0.05, prompt=900), Slo())[1].changed


def skewed(queue: float = 0.4, itl: float = 0.1, long_share: float = 0.15) -> TrafficProfile:
    """200 prompts, most of 100 tokens and the rest of 900, beside 8 decoding streams in every step."""
    profile = traffic(queue=queue, itl=itl)
    long = int(200 * long_share)
    lengths = [100] * (200 - long) + [900] * long
    profile.histograms["request_prompt_tokens"] = binned(HISTOGRAMS["request_prompt_tokens"][1], lengths)
    profile.histograms["engine_step_decode_rows"] = binned(HISTOGRAMS["engine_step_decode_rows"][1], [8] * 1000)
    return profile


def test_a_queue_and_skewed_prompt_lengths_turn_on_shortest_first_with_room_for_the_median_prompt():
    recipe = load_recipe(RECIPE)  # 32 slots, a 128-token budget: beside 8 decode rows, a 96-token bucket
    (ordered, order), (tuned, budget) = tune_prefill_order(recipe, skewed(), Slo())
    assert (order.field, order.before, order.after) == ("serve.prefill_order", "arrival", "shortest-first")
    assert "queue time p50 in (0.25, 0.5] s" in order.reason and "p50 <= 112, p90 > 896" in order.reason
    assert ordered.serve.prefill_order == tuned.serve.prefill_order == "shortest-first"
    assert (budget.field, budget.before, budget.after) == ("shapes.token_budget", 128, 112 + 8)
    assert "leaves it a 96-token bucket" in budget.reason
    assert tuned.shapes.context_buckets == [16, 32, 64, 96, 112], "128 could never fill beside 8 decode rows"
    assert GraphSet.from_shapes(tuned.shapes).prompt_budget(8) == 112 and not recipe_errors(tuned)


def test_prefill_order_and_budget_stay_without_a_queue_or_skew_or_with_itl_over_its_objective():
    recipe = load_recipe(RECIPE)
    for profile in (skewed(queue=0.0), skewed(long_share=0.0)):
        ((kept, change),) = tune_prefill_order(recipe, profile, Slo())
        assert kept == recipe and not change.changed and "prefill order kept" in change.reason
    (_, order), (tuned, budget) = tune_prefill_order(recipe, skewed(queue=2.0, itl=0.6), Slo(itl_s=0.2))
    assert order.changed and not budget.changed and "ITL p90 in (0.5, 0.75] s" in budget.reason
    assert tuned.shapes.token_budget == 128


def test_full_slots_and_a_queue_double_the_slots_and_idle_slots_shrink_them():
    recipe = load_recipe(RECIPE)
    busy = traffic(running=32, itl=0.05, queue=2.0)
    tuned, change = tune_slots(recipe, busy, Slo(itl_s=0.2))
    assert (change.before, change.after) == (32, 64) and "queue time p50 in (1, 2.5] s" in change.reason
    assert tuned.shapes.batch_buckets[-1] == 64 and tuned.shapes.token_budget == 128 + 32
    # The same queue with ITL already at the objective: more slots would slow every stream.
    assert not tune_slots(recipe, traffic(running=32, itl=0.3, queue=2.0), Slo(itl_s=0.2))[1].changed
    tuned, change = tune_slots(recipe, traffic(running=6), Slo())
    assert (change.before, change.after) == (32, 6) and "99 % of steps left 26 slots empty" in change.reason
    assert tuned.shapes.batch_buckets == [1, 2, 4, 6] and not recipe_errors(tuned)


def test_decode_itl_over_the_objective_raises_tp_to_a_degree_the_heads_divide():
    recipe = load_recipe(RECIPE)
    slow_decode = traffic(prompt_share=0.0, itl=0.5)
    tuned, change = tune_parallelism(recipe, slow_decode, Slo(itl_s=0.2), SMOLLM_HEADS, cores=4)
    assert (change.field, change.before, change.after) == ("target.tp_degree", 1, 3)  # 9 heads: not 2
    tuned, change = tune_parallelism(recipe, slow_decode, Slo(itl_s=0.2), SMOLLM_HEADS, cores=2)
    assert not change.changed and "TP 2: target.tp_degree: the model's 9 attention heads" in change.reason


def test_latency_to_spare_and_a_queue_add_a_replica_where_there_are_cores():
    recipe = load_recipe(RECIPE)
    queued = traffic(ttft=0.2, itl=0.05, queue=1.0)
    tuned, change = tune_parallelism(recipe, queued, Slo(ttft_s=1.0, itl_s=0.2), SMOLLM_HEADS, cores=2)
    assert (change.field, change.before, change.after) == ("serve.workers", 1, 2)
    assert tuned.serve.workers == 2
    _, change = tune_parallelism(recipe, queued, Slo(ttft_s=1.0, itl_s=0.2), SMOLLM_HEADS, cores=1)
    assert not change.changed and "no cores for another replica" in change.reason


def test_tune_reports_every_setting_and_the_result_passes_the_rules():
    result = tune(load_recipe(RECIPE), traffic(running=6, itl=0.6), Slo(itl_s=0.2), config=SMOLLM_HEADS, cores=2)
    fields = [c.field for c in result.changes]
    assert fields[:4] == ["shapes.context_buckets[-1]", "shapes.batch_size", "serve.prefill_order", "serve.workers"]
    assert {c.field for c in result.changes if c.changed} >= {"shapes.context_buckets[-1]", "shapes.batch_size"}
    assert not recipe_errors(result.recipe, SMOLLM_HEADS)
