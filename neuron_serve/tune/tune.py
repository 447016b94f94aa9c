"""`neuron-serve tune`: a recipe's buckets refitted to the traffic a deployment served, with reasons.

Each bucket ladder is fitted exactly (``buckets.py``) to the histogram of what it buckets
(``artifact/traffic.py``), with at most as many buckets as the recipe has, so the tuned recipe
compiles no more graphs:

- context buckets to the prompt tokens of each engine step (up to the largest context bucket, which
  sets the step's prompt budget and stays);
- KV (token) buckets to the KV length each step attends (up to max_seq_len);
- batch buckets to each step's decode rows (up to batch_size).

A ladder changes only when the traffic holds enough steps to judge it (`MIN_OBSERVATIONS`) and the
fit pads at least `MIN_GAIN` fewer tokens; every change and every ladder left alone says why, with
the figures. The tuned recipe must pass the recipe rules; a ladder they refuse is kept as it was.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.artifact.traffic import ITL, LENGTH_STEP, QUEUE_TIME, TTFT, TrafficProfile
from neuron_serve.recipe.schema import Recipe
from neuron_serve.recipe.validation import recipe_errors
from neuron_serve.tune.buckets import BucketFit, fit_buckets, padding_of

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


@dataclass(frozen=True)
class Change:
    field: str
    before: tuple[int, ...]
    after: tuple[int, ...]
    reason: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def read_profiles(directory: Path) -> TrafficProfile:
    """Every ``traffic-*.json`` under `directory`, merged (counts add up over captures)."""
    paths = sorted(Path(directory).rglob("traffic-*.json"))
    if not paths:
        raise ValueError(f"no traffic profiles (traffic-*.json) under {directory}")
    profile = TrafficProfile.read(paths[0])
    for path in paths[1:]:
        profile = profile.merged(TrafficProfile.read(path))
    return profile


def current_ladder(recipe: Recipe, field: str) -> tuple[int, ...]:
    """A recipe's ladder as its graphs use it (batch buckets default to powers of two)."""
    return getattr(GraphSet.from_shapes(recipe.shapes), field)


def _describe(fit: BucketFit) -> str:
    return f"{fit.wasted_tokens:,} padding of {fit.padded_tokens:,} token slots"


def refit(recipe: Recipe, profile: TrafficProfile, ladder: Ladder) -> Change:
    """The ladder fitted to the profile, or the recipe's own with the reason it stays."""
    before = tuple(current_ladder(recipe, ladder.field))
    histogram = profile.histograms[ladder.histogram].by_length()
    steps = sum(histogram.values())
    if steps < MIN_OBSERVATIONS:
        return Change(ladder.field, before, before, f"{steps} steps observed, fewer than {MIN_OBSERVATIONS}")
    now = padding_of(histogram, before)
    fit = fit_buckets(histogram, len(before), before[-1], ladder.multiple)
    evidence = f"{ladder.what} over {steps:,} steps: {_describe(now)} with {list(before)}"
    if fit.padded_tokens > (1 - MIN_GAIN) * now.padded_tokens:
        return Change(ladder.field, before, before, f"{evidence}; the best fit saves under {MIN_GAIN:.0%}")
    return Change(ladder.field, before, fit.buckets, f"{evidence}, {_describe(fit)} with {list(fit.buckets)}")


def tune(recipe: Recipe, profile: TrafficProfile) -> tuple[Recipe, list[Change], list[str]]:
    """(the tuned recipe, one change per ladder, warnings about the traffic)."""
    tuned, changes = copy.deepcopy(recipe), []
    for ladder in LADDERS:
        change = refit(tuned, profile, ladder)
        if change.changed:
            trial = copy.deepcopy(tuned)
            trial.shapes = dataclasses.replace(trial.shapes, **{ladder.field: list(change.after)})
            errors = recipe_errors(trial)
            if errors:
                change = Change(ladder.field, change.before, change.before, f"the fit breaks a rule: {errors[0]}")
            else:
                tuned = trial
        changes.append(change)
    return tuned, changes, _warnings(recipe, profile)


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
