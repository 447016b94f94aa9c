"""Which layouts of a model fit each Inf2/Trn1 instance, and how fast and cheap each would serve (`plan`).

A layout is TP degree x replicas x batch size (decode slots per replica) on one instance, and it is the
neuron recipe it would be written as (`layout_recipe`): the rules it breaks are `recipe validate`'s, and
its memory per NeuronCore is `recipe.memory.core_memory` of that recipe, so `plan` and `recipe validate`
agree by construction. Replicas take every NeuronCore they can (at most one per sequence); each replica
takes its share of the concurrent sequences, or as many as its cores' HBM holds.

Speed is a roofline per NeuronCore; the TP ranks of a replica work in parallel, so a core's time is the
replica's. Each phase takes the longer of its compute (2 FLOPs per linear-layer weight per token, over
the TP ranks) and its reads (the rank's weights, less the embedding table unless lm_head shares it: a
gather reads one row per token):

- TTFT: the prefill of one prompt (context / 2 tokens unless given): compute-bound at these lengths.
- ITL: one decode step of a full replica, which also reads its KV cache at the average context
  (batch x context / 2 tokens): bandwidth-bound at the batch sizes that fit.

Peak figures, no efficiency factor, and neither attention's own FLOPs (quadratic in the prompt) nor the
TP all-reduces: real TTFT and ITL are longer, so the figures rank layouts rather than promise latencies.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

from neuron_serve.model.config import ModelConfig
from neuron_serve.recipe.instances import ALLOWED_TP_DEGREES, INSTANCES, Instance
from neuron_serve.recipe.memory import GIB, CoreMemory, core_memory
from neuron_serve.recipe.schema import Recipe, TargetSection, torch_dtype
from neuron_serve.recipe.validation import check_heads, recipe_errors

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class Roofline:
    """What one unit of a replica (a NeuronCore, or the whole CPU host) reads and computes per second."""

    name: str
    bytes_per_s: float
    flops_per_s: float

    def seconds(self, flops: float, nbytes: float) -> float:
        return max(flops / self.flops_per_s, nbytes / self.bytes_per_s)


# An Inferentia2 or Trainium1 chip (AWS's published figures) has 2 NeuronCore-v2 that share 820 GB/s of
# HBM and 190 dense BF16 TFLOPS. The BF16 rate stands for every dtype: recipes cast fp32 matmuls to bf16
# (compiler.auto_cast "matmult"), and weight-only quantization computes in the model's dtype.
CORES_PER_CHIP = 2
NEURON_CORE_V2 = Roofline("NeuronCore-v2", 820e9 / CORES_PER_CHIP, 190e12 / CORES_PER_CHIP)


@dataclass(frozen=True)
class PlanRequest:
    dtype: str = "bfloat16"
    quantization: str = "none"
    context: int = 4096  # max_seq_len of every sequence
    concurrency: int = 32  # sequences decoding at once on one instance
    prompt_tokens: int = 0  # the prompt that TTFT prefills; 0: context // 2
    itl_slo_s: float = 0.2  # human reading speed: chat gains nothing from a shorter ITL

    def __post_init__(self) -> None:
        if self.context < 1 or self.concurrency < 1 or not 0 <= self.prompt_tokens <= self.context:
            raise ValueError(f"need context >= 1, concurrency >= 1 and 0 <= prompt tokens <= context: {self}")

    @property
    def prompt(self) -> int:
        return self.prompt_tokens or max(1, self.context // 2)


@dataclass(frozen=True)
class ModelFacts:
    """The whole model in the plan's dtype and quantization."""

    matmul_params: int  # weights of the linear layers: 2 FLOPs each per token
    gathered_bytes: int  # the embedding table when lm_head does not share it: read a row per token
    weight_bytes: int  # what a single TP rank holds: all of it
    kv_bytes_per_token: int  # K and V of every layer and KV head


@dataclass(frozen=True)
class Layout:
    instance: str
    tp_degree: int
    replicas: int
    batch_size: int  # decode slots per replica
    usd_per_hour: float | None  # None: no price (the cpu row)
    reasons: tuple[str, ...] = ()  # why the layout is infeasible; none when it is feasible
    weight_bytes: int = 0  # on one NeuronCore (on cpu, in the host's memory)
    kv_cache_bytes: int = 0
    ttft_s: float = math.nan
    itl_s: float = math.nan
    tokens_per_s: float = 0.0  # output tokens of the whole instance at the planned concurrency

    @property
    def feasible(self) -> bool:
        return not self.reasons

    @property
    def slots(self) -> int:
        return self.replicas * self.batch_size

    @property
    def usd_per_1m_tokens(self) -> float | None:
        # The formula of bench's report (`bench.cost.CostModel.usd_per_unit`), which tune may not import.
        if self.usd_per_hour is None or self.tokens_per_s <= 0:
            return None
        return self.usd_per_hour / (self.tokens_per_s * SECONDS_PER_HOUR) * 1e6

    def instances_for(self, concurrency: int) -> int:
        return math.ceil(concurrency / self.slots)


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    model: ModelFacts
    layouts: tuple[Layout, ...]
    latency_optimal: Layout | None  # the lowest ITL among layouts that hold the whole concurrency
    cost_optimal: Layout | None  # the lowest cost per token among layouts within the ITL SLO


def _fit_buckets(buckets: list[int], context: int) -> list[int]:
    """Buckets below the context, then the context itself: every sequence length has a graph."""
    return [*(b for b in buckets if b < context), context]


def layout_recipe(base: Recipe, instance: str, tp: int, replicas: int, batch: int, request: PlanRequest) -> Recipe:
    """`base` serving one layout on a neuron instance, in the request's dtype, quantization and context."""
    shapes = dataclasses.replace(
        base.shapes,
        batch_size=batch,
        max_seq_len=request.context,
        context_buckets=_fit_buckets(base.shapes.context_buckets, request.context),
        token_buckets=_fit_buckets(base.shapes.token_buckets, request.context),
        # Both were sized for the base's batch: [] and 0 let the engine derive them from batch_size.
        batch_buckets=[],
        token_budget=0,
    )
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, dtype=request.dtype),
        target=TargetSection(kind="neuron", instance=instance, tp_degree=tp),
        shapes=shapes,
        quantization=dataclasses.replace(base.quantization, method=request.quantization),
        serve=dataclasses.replace(base.serve, workers=replicas),
    )


def model_facts(base: Recipe, config: ModelConfig, request: PlanRequest) -> ModelFacts:
    import torch  # lazily: the command line starts without torch
    from torch import nn

    from neuron_serve.model.kv_cache import KVCache
    from neuron_serve.model.llama import LlamaModel

    with torch.device("meta"):
        model = LlamaModel(config, max_seq_len=1)
    dtype = torch_dtype(request.dtype)
    # A single rank holds the whole model whichever instance it is on: any catalog entry sizes it.
    whole = core_memory(layout_recipe(base, next(iter(INSTANCES)), 1, 1, 1, request), config)
    return ModelFacts(
        matmul_params=sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)),
        gathered_bytes=0 if config.tie_word_embeddings else model.embed_tokens.weight.numel() * dtype.itemsize,
        weight_bytes=whole.weights,
        kv_bytes_per_token=KVCache.nbytes(config, 1, 1, config.num_key_value_heads, dtype),
    )


def rule_errors(recipe: Recipe, config: ModelConfig) -> list[str]:
    """What `recipe validate` says of a layout's recipe but for the rules that need more of the model than
    its heads: memory, which `evaluate` sizes itself, and the NKI kernels' tiles and int4 groups, which
    the base recipe brings and `--write-recipe` judges."""
    errors = recipe_errors(recipe)
    check_heads(errors, recipe.target.tp_degree, config)
    return errors


def _speeds(
    hw: Roofline, facts: ModelFacts, request: PlanRequest, tp: int, batch: int, weights: int, kv_per_token: int
) -> tuple[float, float]:
    """(TTFT, ITL) in seconds of a replica whose units each hold `weights` and `kv_per_token` bytes."""
    flops_per_token = 2 * facts.matmul_params / tp
    read = weights - facts.gathered_bytes
    ttft = hw.seconds(flops_per_token * request.prompt, read)
    itl = hw.seconds(flops_per_token * batch, read + batch * request.context / 2 * kv_per_token)
    return ttft, itl


def _does_not_fit(m: CoreMemory, one_slot: int, context: int) -> str:
    return (
        f"does not fit: {m.weights / GIB:.2f} GiB of weights + {one_slot / GIB:.2f} GiB of KV cache (one slot "
        f"and the scratch row x {context} tokens) + {m.reserve / GIB:.2f} GiB runtime reserve > "
        f"{m.hbm / GIB:.2f} GiB of HBM per NeuronCore"
    )


def evaluate(
    base: Recipe, config: ModelConfig, facts: ModelFacts, request: PlanRequest, instance: Instance, tp: int
) -> Layout:
    """One TP degree on one instance: its replicas and batch size, or why it cannot run."""
    from neuron_serve.model.kv_cache import KVCache  # lazily: the command line starts without torch

    replicas = max(1, min(instance.neuron_cores // tp, request.concurrency))
    wanted = math.ceil(request.concurrency / replicas)
    row = Layout(instance.name, tp, replicas, wanted, instance.usd_per_hour)
    recipe = layout_recipe(base, instance.name, tp, replicas, wanted, request)
    if errors := rule_errors(recipe, config):
        return dataclasses.replace(row, reasons=tuple(errors))
    m, dtype = core_memory(recipe, config), recipe.model.torch_dtype
    kv_per_token = KVCache.nbytes(config, 1, 1, m.kv_heads, dtype)
    slot = KVCache.nbytes(config, 1, request.context, m.kv_heads, dtype)
    # The KV cache grows by one slot's bytes per sequence: drop as many as the HBM lacks.
    batch = min(wanted, wanted + m.headroom // slot)
    if batch < 1:
        one_slot = KVCache.nbytes(config, KVCache.device_slots(1), request.context, m.kv_heads, dtype)
        return dataclasses.replace(row, reasons=(_does_not_fit(m, one_slot, request.context),))
    if batch < wanted:
        m = core_memory(layout_recipe(base, instance.name, tp, replicas, batch, request), config)
    ttft, itl = _speeds(NEURON_CORE_V2, facts, request, tp, batch, m.weights, kv_per_token)
    streams = min(request.concurrency, replicas * batch)
    return dataclasses.replace(
        row,
        batch_size=batch,
        weight_bytes=m.weights,
        kv_cache_bytes=m.kv_cache,
        ttft_s=ttft,
        itl_s=itl,
        tokens_per_s=streams / itl,
    )


def cpu_layout(facts: ModelFacts, request: PlanRequest, host: Roofline) -> Layout:
    """The cpu target: one replica of the whole model holding every sequence, at the host's measured
    rates. The host's memory is not checked (nor does `recipe validate` check it)."""
    batch = request.concurrency
    ttft, itl = _speeds(host, facts, request, 1, batch, facts.weight_bytes, facts.kv_bytes_per_token)
    kv_cache = batch * request.context * facts.kv_bytes_per_token
    return Layout(
        "cpu",
        1,
        1,
        batch,
        usd_per_hour=None,
        weight_bytes=facts.weight_bytes,
        kv_cache_bytes=kv_cache,
        ttft_s=ttft,
        itl_s=itl,
        tokens_per_s=batch / itl,
    )


def candidate_tp_degrees(instance: Instance) -> tuple[int, ...]:
    """The TP degrees of the instance's family, and those that split its cores evenly into replicas,
    so that the plan shows why the ones it cannot use are out."""
    cores = instance.neuron_cores
    divisors = {d for d in range(1, cores + 1) if cores % d == 0}
    return tuple(sorted(divisors | set(ALLOWED_TP_DEGREES[instance.family])))


def _optima(rows: list[Layout], request: PlanRequest) -> tuple[Layout | None, Layout | None]:
    """Higher TP buys latency: the latency-optimal layout holds every sequence at the lowest ITL.
    Replicas buy throughput, and an ITL below reading speed buys nothing: the cost-optimal layout is the
    cheapest per token within the SLO (an instance short of slots is repeated: cost per token holds)."""
    feasible = [r for r in rows if r.feasible]
    holding = [r for r in feasible if r.slots >= request.concurrency]
    latency = min(holding, key=lambda r: (r.itl_s, r.usd_per_1m_tokens or math.inf), default=None)
    priced = [r for r in feasible if r.itl_s <= request.itl_slo_s and r.usd_per_1m_tokens is not None]
    cost = min(priced, key=lambda r: (r.usd_per_1m_tokens, r.itl_s), default=None)
    return latency, cost


def plan(
    base: Recipe,
    config: ModelConfig,
    request: PlanRequest,
    instances: Iterable[Instance],
    tp_degrees: tuple[int, ...] | None = None,
    host: Roofline | None = None,
) -> Plan:
    """Every layout of `base`'s model on `instances` (and on the cpu host, when its rates are given)."""
    if tp_degrees and min(tp_degrees) < 1:
        raise ValueError(f"TP degrees must be >= 1, got {tp_degrees}")
    facts = model_facts(base, config, request)
    rows = [
        evaluate(base, config, facts, request, inst, tp)
        for inst in instances
        for tp in (tp_degrees or candidate_tp_degrees(inst))
    ]
    if host is not None:
        rows.append(cpu_layout(facts, request, host))
    return Plan(request, facts, tuple(rows), *_optima(rows, request))
