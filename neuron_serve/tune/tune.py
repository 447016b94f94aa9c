"""`neuron-serve tune`: a recipe changed to fit the traffic a deployment served, each change with its reasons.

First the serving settings (``serving.py``): the prompt budget, the slots, the prefill order, TP
degree vs replicas, each judged from latencies (against an objective where one is given). Then each
bucket ladder is fitted exactly (``buckets.py``) to the histogram of what it buckets
(``artifact/traffic.py``), with at most as many buckets as the recipe has, so the tuned recipe
compiles no more graphs:

- context buckets to the prompt tokens of each engine step (up to the largest context bucket, which
  sets the step's prompt budget and stays);
- KV (token) buckets to the KV length each step attends (up to max_seq_len);
- batch buckets to each step's decode rows (up to batch_size).

A ladder changes only when the traffic holds enough steps to judge it (`MIN_OBSERVATIONS`) and the
fit pads at least `MIN_GAIN` fewer tokens; every change and every ladder left alone says why, with
the figures. Last, what a device profile supports (``device_rules.py``): kernels and compiler flags,
with advice on what the profile cannot justify alone (quantization). The tuned recipe must pass the
recipe rules; a change they refuse is not made, and the report says which rule refused it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.artifact.manifest import read_manifest
from neuron_serve.artifact.traffic import ITL, LENGTH_STEP, QUEUE_TIME, TTFT, TrafficProfile
from neuron_serve.model.config import ModelConfig
from neuron_serve.recipe.cli import model_config_path
from neuron_serve.recipe.schema import HeadCounts, Recipe
from neuron_serve.recipe.validation import recipe_errors
from neuron_serve.tune.buckets import BucketFit, fit_buckets, padding_of
from neuron_serve.tune.device_profile import DeviceProfile
from neuron_serve.tune.device_rules import tune_from_device
from neuron_serve.tune.serving import (
    PROMPT_BUDGET,
    Change,
    Slo,
    host_cores,
    tune_parallelism,
    tune_prefill_order,
    tune_prompt_budget,
    tune_slots,
)

MIN_OBSERVATIONS = 100  # steps: fewer is an anecdote, not a distribution
MIN_GAIN = 0.05  # of the padded tokens: smaller gains are not worth a recompile


@dataclass(frozen=True)
class Ladder:
    """One bucket ladder of [shapes]: the recipe field, the histogram it is fitted to, its largest
    bucket and the multiple its other buckets keep."""

    field: str
    histogram: str
    what: str
    multiple: int


LADDERS = (
    Ladder("context_buckets", "engine_step_prompt_tokens", "prompt tokens per step", LENGTH_STEP),
    Ladder("token_buckets", "engine_step_kv_length", "KV length per step", LENGTH_STEP),
    Ladder("batch_buckets", "engine_step_decode_rows", "decode rows per step", 1),
)


def read_profiles(directory: Path) -> TrafficProfile:
    """Every ``traffic-*.json`` under `directory`, merged (counts add up over captures)."""
    paths = sorted(Path(directory).rglob("traffic-*.json"))
    if not paths:
        raise ValueError(f"no traffic profiles (traffic-*.json) under {directory}")
    profile = TrafficProfile.read(paths[0])
    for path in paths[1:]:
        profile = profile.merged(TrafficProfile.read(path))
    return profile


def read_device_profile(directory: Path) -> DeviceProfile | None:
    """The latest ``device-*.json`` under `directory` (a device profile describes one build), or None."""
    paths = sorted(Path(directory).rglob("device-*.json"), key=lambda p: p.name)
    return DeviceProfile.read(paths[-1]) if paths else None


def recipe_model_config(recipe: Recipe, recipe_dir: Path, explicit: Path | None) -> ModelConfig | None:
    """The model's config: `explicit`, else the one the recipe names, else its compiled artifact's."""
    path = explicit or model_config_path(recipe, recipe_dir)
    if path is not None:
        return ModelConfig.from_hf(json.loads(Path(path).read_text()))
    manifest = Path("artifacts") / recipe.name / "manifest.json"
    return read_manifest(manifest.parent).model_config if manifest.is_file() else None


def current_ladder(recipe: Recipe, field: str) -> tuple[int, ...]:
    """A recipe's ladder as its graphs use it (batch buckets default to powers of two)."""
    return getattr(GraphSet.from_shapes(recipe.shapes), field)


def _describe(fit: BucketFit) -> str:
    return f"{fit.wasted_tokens:,} padding of {fit.padded_tokens:,} token slots"


def refit(recipe: Recipe, profile: TrafficProfile, ladder: Ladder) -> Change:
    """The ladder fitted to the profile, or the recipe's own with the reason it stays."""
    field = f"shapes.{ladder.field}"
    before = tuple(current_ladder(recipe, ladder.field))
    # Past the largest bucket (a prompt budget or slots tune just lowered), a step takes the largest.
    histogram: dict[int, int] = {}
    for length, count in profile.histograms[ladder.histogram].by_length().items():
        histogram[min(length, before[-1])] = histogram.get(min(length, before[-1]), 0) + count
    steps = sum(histogram.values())
    if steps < MIN_OBSERVATIONS:
        return Change(field, before, before, f"{steps} steps observed, fewer than {MIN_OBSERVATIONS}")
    now = padding_of(histogram, before)
    fit = fit_buckets(histogram, len(before), before[-1], ladder.multiple)
    evidence = f"{ladder.what} over {steps:,} steps: {_describe(now)} with {list(before)}"
    if fit.padded_tokens > (1 - MIN_GAIN) * now.padded_tokens:
        return Change(field, before, before, f"{evidence}; the best fit saves under {MIN_GAIN:.0%}")
    return Change(field, before, fit.buckets, f"{evidence}, {_describe(fit)} with {list(fit.buckets)}")


def _ladder_recipe(recipe: Recipe, change: Change) -> Recipe:
    name = change.field.removeprefix("shapes.")
    return dataclasses.replace(recipe, shapes=dataclasses.replace(recipe.shapes, **{name: list(change.after)}))


@dataclass
class Tuning:
    """The tuned recipe, every setting tune judged (changed or kept, each with its evidence), warnings
    about the traffic and advice that tune does not act on."""

    recipe: Recipe
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    def apply(self, trial: Recipe, change: Change, config: HeadCounts | None) -> None:
        """Take `trial` (the recipe with `change` made) unless it breaks a rule, then the change is kept."""
        if change.changed and (errors := recipe_errors(trial, config)):
            change = Change(change.field, change.before, change.before, f"{change.reason}; not made: {errors[0]}")
        elif change.changed:
            self.recipe = trial
        self.changes.append(change)


def tune(
    recipe: Recipe,
    profile: TrafficProfile,
    slo: Slo | None = None,
    device: DeviceProfile | None = None,
    config: HeadCounts | None = None,
    cores: int | None = None,
) -> Tuning:
    """The serving settings against the SLO (``serving.py``), then each bucket ladder under them, then
    what the device profile supports (``device_rules.py``)."""
    slo, result = slo or Slo(), Tuning(copy.deepcopy(recipe))
    steps = profile.histograms["engine_step_running"].observations
    if steps < MIN_OBSERVATIONS:
        for name, value in (
            (PROMPT_BUDGET, max(recipe.shapes.context_buckets)),
            ("shapes.batch_size", recipe.shapes.batch_size),
            ("serve.workers", recipe.serve.workers),
        ):
            result.changes.append(Change(name, value, value, f"{steps} steps observed, fewer than {MIN_OBSERVATIONS}"))
    else:
        result.apply(*tune_prompt_budget(result.recipe, profile, slo), config)
        result.apply(*tune_slots(result.recipe, profile, slo, config), config)
        for trial, change in tune_prefill_order(result.recipe, profile, slo):  # at the slots tune left
            result.apply(trial, change, config)
        cores = cores or host_cores(recipe)
        result.apply(*tune_parallelism(result.recipe, profile, slo, config, cores), config)
    budget_changed = _prompt_room(result.recipe) != _prompt_room(recipe)
    for ladder in LADDERS:
        if ladder.field == "context_buckets" and budget_changed:
            buckets = tuple(result.recipe.shapes.context_buckets)
            reason = "the prompt budget changed above: the steps' prompt tokens, cut to the old one, are no evidence"
            result.changes.append(Change(f"shapes.{ladder.field}", buckets, buckets, reason))
            continue
        change = refit(result.recipe, profile, ladder)
        result.apply(_ladder_recipe(result.recipe, change), change, config)
    if device is not None:
        tuned, changes, result.advice = tune_from_device(result.recipe, device)
        for change in changes:
            section = change.field.split(".")[0]
            trial = dataclasses.replace(result.recipe, **{section: getattr(tuned, section)})
            result.apply(trial, change, config)
    result.warnings = _warnings(recipe, profile)
    return result


def _prompt_room(recipe: Recipe) -> tuple[int, list[int]]:
    """What a step leaves for prompts beside a full batch of decodes, and the buckets it is cut into."""
    graphs = GraphSet.from_shapes(recipe.shapes)
    return graphs.token_budget - graphs.batch_size, list(graphs.context_buckets)


def _warnings(recipe: Recipe, profile: TrafficProfile) -> list[str]:
    prompts = profile.histograms["request_prompt_tokens"]
    largest = max(recipe.shapes.context_buckets)
    longer = sum(count for length, count in prompts.by_length().items() if length > largest) + prompts.overflow
    if not longer:
        return []
    return [
        f"{longer} of {prompts.observations} prompts were longer than the largest context bucket ({largest}) "
        "and were prefilled over several steps; a larger bucket (and token budget) would take them in one"
    ]


def traffic_summary(profile: TrafficProfile) -> str:
    """One line of what was served: requests, and the bins holding the latencies' p50 and p99."""
    requests = profile.histograms["request_prompt_tokens"].observations
    parts = [f"{requests} requests"]
    for label, name in (("TTFT", TTFT), ("ITL", ITL), ("queue", QUEUE_TIME)):
        if name in profile.histograms:
            h = profile.histograms[name]
            parts.append(f"{label} p50 <= {h.quantile(0.5):g} s, p99 <= {h.quantile(0.99):g} s")
    padded = sum(p for _, p in profile.graphs.values())
    if padded:
        real = sum(r for r, _ in profile.graphs.values())
        parts.append(f"{1 - real / padded:.1%} of the graphs' token slots were padding")
    return "; ".join(parts)
