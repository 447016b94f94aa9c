"""`neuron-serve tune`: a recipe's buckets refitted to captured traffic, each change with its figures."""

from __future__ import annotations

import random
from pathlib import Path

from neuron_serve.artifact.traffic import HISTOGRAMS, Binned, TrafficProfile
from neuron_serve.cli import main
from neuron_serve.recipe.files import load_recipe
from neuron_serve.recipe.validation import recipe_errors
from neuron_serve.tune.buckets import padding_of
from neuron_serve.tune.tune import MIN_OBSERVATIONS, tune

RECIPE = Path(__file__).resolve().parent.parent / "compile" / "smollm2-135m-cpu.toml"


def binned(name: str, values: list[int]) -> Binned:
    bins = HISTOGRAMS[name][1]
    counts = [0] * len(bins)
    for value in values:
        counts[next(i for i, b in enumerate(bins) if value <= b)] += 1
    return Binned(bins, counts, 0, float(sum(values)))


def skewed_profile(steps: int, seed: int = 0) -> TrafficProfile:
    """Steps whose prompt tokens sit near 40 (most) or fill the 128-token budget, KV lengths mostly
    short, and few streams decoding."""
    rng = random.Random(seed)
    prompt = [rng.choice([rng.randint(33, 48)] * 4 + [128]) for _ in range(steps)]
    kv = [rng.choice([rng.randint(100, 300)] * 9 + [rng.randint(1500, 2048)]) for _ in range(steps)]
    rows = [rng.randint(1, 3) for _ in range(steps)]
    histograms = {name: binned(name, []) for name in HISTOGRAMS}
    histograms["engine_step_prompt_tokens"] = binned("engine_step_prompt_tokens", prompt)
    histograms["engine_step_kv_length"] = binned("engine_step_kv_length", kv)
    histograms["engine_step_decode_rows"] = binned("engine_step_decode_rows", rows)
    return TrafficProfile("smollm2-135m-cpu", histograms, "20261130T000000Z")


def test_each_ladder_is_refitted_with_at_most_as_many_buckets_and_less_padding():
    recipe, profile = load_recipe(RECIPE), skewed_profile(2000)
    result = tune(recipe, profile)
    assert not recipe_errors(result.recipe) and result.warnings == []
    by_field = {c.field.removeprefix("shapes."): c for c in result.changes}
    for field, histogram in (
        ("context_buckets", "engine_step_prompt_tokens"),
        ("token_buckets", "engine_step_kv_length"),
        ("batch_buckets", "engine_step_decode_rows"),
    ):
        change = by_field[field]
        assert change.changed and len(change.after) <= len(change.before) and change.after[-1] == change.before[-1]
        observed = profile.histograms[histogram].by_length()
        before, after = padding_of(observed, change.before), padding_of(observed, change.after)
        assert after.wasted_tokens < before.wasted_tokens
        assert (
            f"{before.wasted_tokens:,} padding" in change.reason and f"{after.wasted_tokens:,} padding" in change.reason
        )
        assert getattr(result.recipe.shapes, field) == list(change.after)


def test_too_little_traffic_changes_nothing_and_says_so():
    recipe = load_recipe(RECIPE)
    result = tune(recipe, skewed_profile(MIN_OBSERVATIONS - 1))
    assert result.recipe.shapes == recipe.shapes
    assert all("steps observed" in c.reason and not c.changed for c in result.changes)


def test_the_cli_writes_the_tuned_recipe_and_reports_on_stderr(tmp_path, capsys):
    skewed_profile(2000).write(tmp_path / "profiles" / "smollm2-135m-cpu")
    out = tmp_path / "tuned.toml"
    assert main(["tune", str(RECIPE), "--profiles", str(tmp_path / "profiles"), "--out", str(out)]) == 0
    report = capsys.readouterr().err
    assert "shapes.context_buckets: [16, 32, 64, 96, 128] -> [" in report and f"wrote {out}" in report
    assert "  0 requests" in report  # the synthetic profile holds steps only
    assert load_recipe(out).shapes != load_recipe(RECIPE).shapes


def test_the_cli_reads_a_device_profile_beside_the_traffic_and_takes_an_slo(tmp_path, capsys):
    from neuron_serve.tune.device_profile import DeviceProfile, GraphProfile

    directory = tmp_path / "profiles"
    skewed_profile(2000).write(directory)
    decode = GraphProfile("step_decode_8x1024", "decode", 100, 0.1, {"attention": 0.05, "matmul": 0.05}, 1, 1, 0.6, 0.1)
    DeviceProfile("smollm2-135m-cpu", "cpu", {"name": "cpu host"}, [decode]).write(directory)
    args = ["tune", str(RECIPE), "--profiles", str(directory), "--slo", "itl=0.2", "--out", str(tmp_path / "t.toml")]
    assert main(args) == 0
    report = capsys.readouterr().err
    assert "kernels.enabled: kept: attention takes 50% of decode time" in report
    assert (
        "device: decode: 10.00 s of device time; matmul 50%, attention 50%; MBU 60%, MFU 10% (bandwidth-bound)"
        in report
    )
    assert main(["tune", str(RECIPE), "--profiles", str(directory), "--slo", "itl=soon"]) == 2
