"""The serving settings `tune` derives from latencies against a service-level objective.

Three rules, each firing only when the traffic's figures clearly fall on one side of the objective
(`Judged`: a percentile's whole histogram bin above or below it; a bin that straddles it is no
evidence either way):

- **Prompt budget** (the largest context bucket, and ``token_budget`` with it): a step carries at most
  that many prompt tokens beside its decode tokens, so it trades TTFT against ITL. ITL over the
  objective while steps carry prompt chunks: shrink it by the ratio of the objective to the mean ITL.
  TTFT over the objective, ITL well within it and prompts longer than the budget: double it.
- **Slots** (``batch_size``): full slots and a queue, with ITL within the objective: double them, if
  their KV cache fits. Slots never half used: shrink them to the concurrency seen, which frees memory.
- **Prefill order**: requests that queued for over a step while prompt lengths were skewed (the p90
  prompt at least `SKEWED` times the median) go shortest-first (``engine/scheduler.py``), which minimises
  the mean wait when lengths vary; a short prompt only goes first if it fits whole in a step, so the
  token budget grows, if it must, until the median prompt fits beside the usual decode rows, and the
  median's length becomes the largest context bucket. Needs no objective, unless ITL is over one
  (then the budget stays).
- **TP vs replicas** (`plan`'s rule): ITL over the objective with no prompt chunks to blame needs more
  TP degree (decode reads each rank's share of the weights); latency well within the objective and a
  queue needs another replica. Each only where the heads divide and the host or instance has the cores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.artifact.traffic import ITL, LENGTH_STEP, QUEUE_TIME, TTFT, Binned, TrafficProfile
from neuron_serve.backends.registry import backend_for
from neuron_serve.model.config import ModelConfig
from neuron_serve.recipe.schema import HeadCounts, Recipe
from neuron_serve.recipe.validation import check_heads

HEADROOM = 0.5  # "well within": at most half the objective, so that the change cannot push it over
PROMPT_BUDGET = "shapes.context_buckets[-1]"  # the largest context bucket: a step's most prompt tokens
PROMPT_STEP_SHARE = 0.1  # of the steps: fewer prompt-carrying steps cannot explain a missed ITL
SKEWED = 4  # p90 prompt / median prompt: lengths this uneven make the order of prefills matter


@dataclass(frozen=True)
class Slo:
    """Latency objectives in seconds; None: no objective for that latency."""

    ttft_s: float | None = None
    itl_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> Slo:
        """``ttft=2,itl=0.2`` (seconds), either or both."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, number = part.partition("=")
            if name not in ("ttft", "itl"):
                raise ValueError(f"--slo: {part!r}: the objectives are ttft=SECONDS and itl=SECONDS")
            try:
                values[f"{name}_s"] = float(number)
            except ValueError:
                raise ValueError(f"--slo: {part!r}: {number!r} is not a number of seconds") from None
            if not values[f"{name}_s"] > 0:
                raise ValueError(f"--slo: {part!r}: the objective must be more than 0 seconds")
        return cls(**values)


@dataclass(frozen=True)
class Judged:
    """A latency percentile against an objective: "over", "within" or "unclear" (no objective, no data,
    or a bin that straddles it); `figure` says it in words."""

    verdict: str
    figure: str


def judge(
    histogram: Binned | None, q: float, objective: float | None, label: str, limit: float = 1.0, against: str = ""
) -> Judged:
    """Whether `label`'s q-quantile is over the objective or within `limit` x the objective; `against`
    names the objective in the figure when it is not one the user gave."""
    if histogram is None or not histogram.observations:
        return Judged("unclear", f"no {label} observed")
    low, high = histogram.quantile_bounds(q)
    figure = f"{label} p{q * 100:g} in ({low:g}, {high:g}] s"
    if objective is None:
        return Judged("unclear", f"{figure}, no objective given")
    goal = f"the {objective:g} s {against or 'objective'}"
    if low >= objective:
        return Judged("over", f"{figure}, over {goal}")
    if high <= limit * objective:
        return Judged("within", f"{figure}, within {limit:g} x {goal}")
    return Judged("unclear", f"{figure}, not clearly either side of {limit:g} x {goal}")


def judge_queue(profile: TrafficProfile) -> Judged:
    """Whether requests waited for a slot: a median queue time over one step (ITL's median bin), since
    every request waits up to a step for the next step boundary."""
    itl = profile.histograms.get(ITL)
    step = itl.quantile_bounds(0.5)[1] if itl and itl.observations else None
    return judge(profile.histograms.get(QUEUE_TIME), 0.5, step, "queue time", against="step (ITL p50's bound)")


@dataclass(frozen=True)
class Change:
    """One recipe field (dotted) as it was and as tune leaves it, and the evidence."""

    field: str
    before: object
    after: object
    reason: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def _with_shapes(recipe: Recipe, **changes: object) -> Recipe:
    return dataclasses.replace(recipe, shapes=dataclasses.replace(recipe.shapes, **changes))


def _prompt_budget_recipe(recipe: Recipe, largest: int) -> Recipe:
    """The recipe whose steps take at most `largest` prompt tokens, with every slot decoding beside them
    (an explicit token budget becomes batch_size + `largest`; 0 already means that)."""
    s = recipe.shapes
    buckets = [b for b in s.context_buckets if b < largest] + [largest]
    budget = s.token_budget and s.batch_size + largest
    return _with_shapes(recipe, context_buckets=buckets, token_budget=budget)


def tune_prompt_budget(recipe: Recipe, profile: TrafficProfile, slo: Slo) -> tuple[Recipe, Change]:
    h = profile.histograms
    field, largest = PROMPT_BUDGET, max(recipe.shapes.context_buckets)
    itl = judge(h.get(ITL), 0.9, slo.itl_s, "ITL")
    steps = h["engine_step_prompt_tokens"]
    all_steps = h["engine_step_running"].observations
    share = steps.observations / all_steps if all_steps else 0.0
    if itl.verdict == "over" and share >= PROMPT_STEP_SHARE:
        mean_itl = h[ITL].total / h[ITL].observations
        smaller = max(LENGTH_STEP, int(largest * slo.itl_s / mean_itl) // LENGTH_STEP * LENGTH_STEP)
        if smaller < largest:
            reason = (
                f"{itl.figure} (mean {mean_itl:.3g} s) while {share:.0%} of steps carried prompt chunks: a step's "
                f"prompt budget falls from {largest} to {smaller} tokens"
            )
            return _prompt_budget_recipe(recipe, smaller), Change(field, largest, smaller, reason)
    ttft = judge(h.get(TTFT), 0.5, slo.ttft_s, "TTFT")
    relaxed = judge(h.get(ITL), 0.9, slo.itl_s, "ITL", HEADROOM)
    longer = sum(c for n, c in h["request_prompt_tokens"].by_length().items() if n > largest)
    if ttft.verdict == "over" and relaxed.verdict == "within" and longer:
        larger = min(2 * largest, recipe.shapes.max_seq_len)
        reason = (
            f"{ttft.figure}; {relaxed.figure}; {longer} prompts were longer than the {largest}-token budget: "
            f"it doubles to {larger}, so they prefill in half the steps"
        )
        return _prompt_budget_recipe(recipe, larger), Change(field, largest, larger, reason)
    return recipe, Change(field, largest, largest, f"prompt budget kept: {itl.figure}; {ttft.figure}")


def tune_prefill_order(recipe: Recipe, profile: TrafficProfile, slo: Slo) -> list[tuple[Recipe, Change]]:
    """Shortest-first when requests queued and prompt lengths were skewed, and then the token budget
    the median prompt needs to fit whole in a step beside the p99 decode rows."""
    h, before = profile.histograms, recipe.serve.prefill_order
    prompts, queued = h["request_prompt_tokens"], judge_queue(profile)
    if not prompts.observations:
        return [(recipe, Change("serve.prefill_order", before, before, "no prompts observed"))]
    (_, median), (p90, _) = prompts.quantile_bounds(0.5), prompts.quantile_bounds(0.9)
    lengths = f"prompt tokens p50 <= {median:g}, p90 > {p90:g}"
    if queued.verdict != "over" or p90 < SKEWED * median:
        reason = f"prefill order kept: {queued.figure}; {lengths}, not {SKEWED}x apart with a queue"
        return [(recipe, Change("serve.prefill_order", before, before, reason))]
    reason = f"{queued.figure}; {lengths}: short prompts go before long ones"
    order = dataclasses.replace(recipe, serve=dataclasses.replace(recipe.serve, prefill_order="shortest-first"))
    return [(order, Change("serve.prefill_order", before, "shortest-first", reason)), _median_fits(order, h, slo)]


def _median_fits(recipe: Recipe, h: dict[str, Binned], slo: Slo) -> tuple[Recipe, Change]:
    """The token budget at which the median prompt fits whole in a step beside the p99 decode rows,
    with a context bucket of the median's length (its bin's bound) as the largest: a bucket above it
    could never fill beside those rows."""
    s, field = recipe.shapes, "shapes.token_budget"
    graphs, median = GraphSet.from_shapes(s), int(h["request_prompt_tokens"].quantile(0.5))
    rows, largest = int(h["engine_step_decode_rows"].quantile(0.99)), max(s.context_buckets)
    seen = f"the median prompt (<= {median} tokens) beside {rows} decode rows (p99)"
    if graphs.prompt_budget(rows) >= median:
        return recipe, Change(field, s.token_budget, s.token_budget, f"token budget kept: it takes {seen}")
    itl = judge(h.get(ITL), 0.9, slo.itl_s, "ITL")
    if median > largest or itl.verdict == "over":
        why = f"it is over the largest context bucket ({largest})" if median > largest else itl.figure
        return recipe, Change(field, s.token_budget, s.token_budget, f"token budget kept for {seen}: {why}")
    buckets = [b for b in s.context_buckets if b < median] + [median]
    budget, left = median + rows, graphs.prompt_budget(rows)
    reason = (
        f"{seen} needs two steps: a {graphs.token_budget}-token budget leaves it a {left}-token bucket; "
        f"context buckets {list(s.context_buckets)} -> {buckets}"
    )
    return _with_shapes(recipe, token_budget=budget, context_buckets=buckets), Change(
        field, s.token_budget, budget, reason
    )


def _memory_short(recipe: Recipe, config: HeadCounts | None, added: int) -> str:
    """Why `added` more slots' KV cache would not fit ("" when it would, or when the model is unknown)."""
    if not isinstance(config, ModelConfig):
        return ""
    return backend_for(recipe.target.kind).kv_cache_short(recipe, config, added)


def tune_slots(
    recipe: Recipe, profile: TrafficProfile, slo: Slo, config: HeadCounts | None = None
) -> tuple[Recipe, Change]:
    h, slots = profile.histograms, recipe.shapes.batch_size
    running = h["engine_step_running"]
    if not running.observations:
        return recipe, Change("shapes.batch_size", slots, slots, "no engine steps observed")
    busy_p50, busy_p99 = running.quantile(0.5), running.quantile(0.99)
    queued = judge_queue(profile)
    itl = judge(h.get(ITL), 0.9, slo.itl_s, "ITL")
    seen = f"requests holding a slot: p50 {busy_p50:g}, p99 {busy_p99:g} of {slots}"
    if busy_p50 >= slots and queued.verdict == "over" and itl.verdict == "within":
        evidence = f"{seen}; {queued.figure}; {itl.figure}"
        if short := _memory_short(recipe, config, slots):
            return recipe, Change("shapes.batch_size", slots, slots, f"{evidence}; but {short}")
        return _resized(recipe, 2 * slots), Change("shapes.batch_size", slots, 2 * slots, evidence)
    if busy_p99 <= slots // 2:
        fewer = max(1, int(busy_p99))
        reason = f"{seen}: 99 % of steps left {slots - fewer} slots empty; their KV cache is freed"
        return _resized(recipe, fewer), Change("shapes.batch_size", slots, fewer, reason)
    return recipe, Change("shapes.batch_size", slots, slots, f"slots kept: {seen}; {queued.figure}; {itl.figure}")


def _resized(recipe: Recipe, slots: int) -> Recipe:
    s = recipe.shapes
    buckets = s.batch_buckets and [b for b in s.batch_buckets if b < slots] + [slots]
    budget = s.token_budget and s.token_budget - s.batch_size + slots
    return _with_shapes(recipe, batch_size=slots, batch_buckets=buckets, token_budget=budget)


def host_cores(recipe: Recipe) -> int:
    """The cores a deployment of this recipe splits: this host's CPUs, or the instance's NeuronCores."""
    return backend_for(recipe.target.kind).cores(recipe)


def _higher_tp(recipe: Recipe, config: HeadCounts | None, cores: int) -> tuple[int | None, str]:
    """The next TP degree that divides the heads and fits the cores with the replicas, or why none does."""
    tp, replicas = recipe.target.tp_degree, recipe.serve.workers
    if config is None:
        return None, "the model's heads are unknown (pass --model-config)"
    refused = []
    for degree in (d for d in backend_for(recipe.target.kind).tp_degrees(recipe, cores) if d > tp):
        errors: list[str] = []
        check_heads(errors, degree, config)
        if degree * replicas > cores:
            errors.append(f"{replicas} replicas x TP {degree} need {degree * replicas} cores, {cores} here")
        if not errors:
            return degree, ""
        refused.append(f"TP {degree}: {errors[0]}")
    return None, "; ".join(refused) or f"no TP degree above {tp} on {cores} cores"


def tune_parallelism(recipe: Recipe, profile: TrafficProfile, slo: Slo, config, cores: int) -> tuple[Recipe, Change]:
    h, tp, replicas = profile.histograms, recipe.target.tp_degree, recipe.serve.workers
    itl = judge(h.get(ITL), 0.5, slo.itl_s, "ITL")
    prompt_steps = h["engine_step_prompt_tokens"].observations
    steps = h["engine_step_running"].observations
    if itl.verdict == "over" and steps and prompt_steps / steps < PROMPT_STEP_SHARE:
        degree, refused = _higher_tp(recipe, config, cores)
        if degree is None:
            return recipe, Change("target.tp_degree", tp, tp, f"{itl.figure} in decode, but {refused}")
        reason = f"{itl.figure} in decode: TP {degree} reads 1/{degree} of the weights per rank"
        raised = dataclasses.replace(recipe, target=dataclasses.replace(recipe.target, tp_degree=degree))
        return raised, Change("target.tp_degree", tp, degree, reason)
    queued = judge_queue(profile)
    fast = [judge(h.get(TTFT), 0.5, slo.ttft_s, "TTFT", HEADROOM), judge(h.get(ITL), 0.9, slo.itl_s, "ITL", HEADROOM)]
    evidence = "; ".join(j.figure for j in (*fast, queued))
    if queued.verdict == "over" and all(j.verdict == "within" for j in fast):
        if (replicas + 1) * tp > cores:
            return recipe, Change("serve.workers", replicas, replicas, f"{evidence}; no cores for another replica")
        more = dataclasses.replace(recipe, serve=dataclasses.replace(recipe.serve, workers=replicas + 1))
        return more, Change("serve.workers", replicas, replicas + 1, f"{evidence}: another replica takes the queue")
    return recipe, Change("serve.workers", replicas, replicas, f"layout kept: {evidence}")
