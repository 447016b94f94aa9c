"""Every rule a recipe must follow, each broken one reported with its field (`recipe_errors`)."""

from __future__ import annotations

import re
from typing import Any

from neuron_serve.model.config import ModelConfig
from neuron_serve.recipe.instances import ALLOWED_TP_DEGREES, INSTANCES
from neuron_serve.recipe.memory import memory_errors
from neuron_serve.recipe.schema import (
    AUTO_CAST_TYPES,
    AUTO_CASTS,
    AUTO_DTYPE,
    CPU_MODES,
    DTYPES,
    INT4_GROUP_SIZES,
    MODEL_TYPES,
    OPTLEVELS,
    PREFILL_ORDERS,
    QUANTIZATION_METHODS,
    CompilerSection,
    HeadCounts,
    Recipe,
    RecipeError,
    ServeSection,
    ShapesSection,
)
from neuron_serve.weights.sources import SPECIAL_SOURCES

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def known_kernels() -> tuple[str, ...]:
    from nki_kernels import KERNELS  # lazily: recipes load without importing torch

    return tuple(KERNELS)


def _one_of(errors: list[str], name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        errors.append(f"{name}: must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _at_least(errors: list[str], name: str, value: int, low: int) -> None:
    if value < low:
        errors.append(f"{name}: must be >= {low}, got {value}")


def _check_buckets(errors: list[str], name: str, buckets: list[int], max_seq_len: int) -> None:
    if not buckets:
        errors.append(f"{name}: must not be empty")
        return
    if any(b <= 0 for b in buckets):
        errors.append(f"{name}: every bucket must be positive, got {buckets}")
    if any(a >= b for a, b in zip(buckets, buckets[1:], strict=False)):
        errors.append(f"{name}: must be strictly increasing, got {buckets}")
    if max(buckets) > max_seq_len:
        errors.append(f"{name}: every bucket must be <= shapes.max_seq_len ({max_seq_len}), got {buckets}")


def _check_model(errors: list[str], r: Recipe) -> None:
    _one_of(errors, "model.dtype", r.model.dtype, (*DTYPES, AUTO_DTYPE))
    src = r.model.source
    if not src:
        errors.append("model.source: must not be empty (a local HF dir, a .gguf file, 'default', or s3://)")
    elif src.startswith("s3://"):
        if not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", src):
            errors.append(f"model.source: must look like s3://bucket/prefix, got {src!r}")
    elif "://" in src:
        errors.append(
            f"model.source: only local paths, {' or '.join(map(repr, SPECIAL_SOURCES))} and s3:// URLs "
            f"are supported (nothing is downloaded from a model hub), got {src!r}"
        )


def _check_shapes(errors: list[str], s: ShapesSection) -> None:
    _at_least(errors, "shapes.batch_size", s.batch_size, 1)
    _at_least(errors, "shapes.max_seq_len", s.max_seq_len, 1)
    _check_buckets(errors, "shapes.context_buckets", s.context_buckets, s.max_seq_len)
    _check_buckets(errors, "shapes.token_buckets", s.token_buckets, s.max_seq_len)
    if s.token_buckets and max(s.token_buckets) != s.max_seq_len:
        errors.append(
            f"shapes.token_buckets: the largest bucket must equal shapes.max_seq_len ({s.max_seq_len}) "
            f"so that every sequence has a decode graph, got {s.token_buckets}"
        )
    if s.batch_buckets:
        _check_buckets(errors, "shapes.batch_buckets", s.batch_buckets, s.batch_size)
        if max(s.batch_buckets) != s.batch_size:
            errors.append(
                f"shapes.batch_buckets: the largest bucket must equal shapes.batch_size ({s.batch_size}) "
                f"so that every slot can decode, got {s.batch_buckets}"
            )
    if s.token_budget and s.context_buckets and s.token_budget < s.batch_size + min(s.context_buckets):
        errors.append(
            f"shapes.token_budget: must be 0 (automatic) or at least shapes.batch_size + the smallest context "
            f"bucket ({s.batch_size + min(s.context_buckets)}), so that prompts still get tokens while every "
            f"slot decodes, got {s.token_budget}"
        )


def _check_compiler(errors: list[str], c: CompilerSection) -> None:
    _one_of(errors, "compiler.cpu_mode", c.cpu_mode, CPU_MODES)
    _one_of(errors, "compiler.model_type", c.model_type, MODEL_TYPES)
    _one_of(errors, "compiler.auto_cast", c.auto_cast, AUTO_CASTS)
    _one_of(errors, "compiler.auto_cast_type", c.auto_cast_type, AUTO_CAST_TYPES)
    _one_of(errors, "compiler.optlevel", c.optlevel, OPTLEVELS)
    for flag in c.extra_flags:
        if not flag.startswith("-"):
            errors.append(f"compiler.extra_flags: every entry must be a flag starting with '-', got {flag!r}")


def _check_cpu_target(errors: list[str], r: Recipe) -> None:
    if r.target.tp_degree > 1 and r.compiler.cpu_mode == "aot":
        # AOTInductor graphs that call gloo all-reduces deadlock intermittently (torch 2.13):
        # tensor-parallel CPU ranks run the eager model, which uses the same collectives safely.
        errors.append('compiler.cpu_mode: must be "eager" when target.tp_degree > 1 on cpu')


def _check_decode_blocks(errors: list[str], r: Recipe) -> None:
    from nki_kernels.tiles import DECODE_BLOCK  # lazily: recipes load without importing torch

    odd = [b for b in r.shapes.token_buckets if b % DECODE_BLOCK]
    if odd:
        errors.append(
            f"shapes.token_buckets: the NKI 'decode_attention' kernel reads the cache in blocks of {DECODE_BLOCK} "
            f"keys, so every KV bucket must be a multiple of {DECODE_BLOCK}; got {odd}"
        )


def _check_neuron_target(errors: list[str], r: Recipe) -> None:
    if "decode_attention" in r.kernels.enabled:
        _check_decode_blocks(errors, r)
    if r.quantization.method != "none" and "lm_head" not in r.quantization.skip:
        errors.append(
            "quantization.skip: must list lm_head on neuron: lm_head is a replicated plain layer there, "
            "which neuronx-distributed's quantization does not convert"
        )
    t = r.target
    if not t.instance:
        errors.append(f"target.instance: is required for kind 'neuron'; known: {', '.join(INSTANCES)}")
        return
    if t.instance not in INSTANCES:
        errors.append(f"target.instance: unknown instance type {t.instance!r}; known: {', '.join(INSTANCES)}")
        return
    inst = INSTANCES[t.instance]
    allowed = ALLOWED_TP_DEGREES[inst.family]
    if t.tp_degree not in allowed:
        errors.append(
            f"target.tp_degree: must be one of {', '.join(map(str, allowed))} on {inst.family}, got {t.tp_degree}"
        )
    if t.tp_degree > inst.neuron_cores:
        errors.append(f"target.tp_degree: {t.tp_degree} exceeds the {inst.neuron_cores} NeuronCores of {inst.name}")
    elif r.serve.workers * t.tp_degree > inst.neuron_cores:
        errors.append(
            f"serve.workers: {r.serve.workers} workers x tp_degree {t.tp_degree} = "
            f"{r.serve.workers * t.tp_degree} NeuronCores, but {inst.name} has {inst.neuron_cores}"
        )


# The quantization methods each target runs, and why it refuses the others.
QUANTIZATION_SUPPORT = {
    "cpu": {
        "fp8-weight": "the CPU has no fp8 matmul; fp8-weight is for NeuronCores (use int8-weight or int8-dynamic)",
    },
    "neuron": {
        "int4-weight": "NxD Inference quantizes weights to int8 or fp8 only (quantization_dtype int8, f8e4m3)",
        "int8-dynamic": "NxD Inference quantizes activations dynamically to fp8 only, not int8 (use int8-weight)",
    },
}
# Kernels that read a layer's float weight themselves, so cannot run on quantized layers.
_FLOAT_WEIGHT_KERNELS = ("qkv_rope", "swiglu_mlp")


def _check_quantization(errors: list[str], r: Recipe) -> None:
    q = r.quantization
    _one_of(errors, "quantization.method", q.method, QUANTIZATION_METHODS)
    refused = QUANTIZATION_SUPPORT.get(r.target.kind, {})
    if q.method in refused:
        why = refused[q.method]
        errors.append(f"quantization.method: {q.method!r} is not supported on target {r.target.kind!r}: {why}")
    if q.method == "int4-weight":
        _one_of(errors, "quantization.group_size", q.group_size, INT4_GROUP_SIZES)
    if q.method != "none":
        for kernel in sorted(set(r.kernels.enabled) & set(_FLOAT_WEIGHT_KERNELS)):
            errors.append(
                f"kernels.enabled: {kernel!r} reads float weights and cannot run with quantization.method {q.method!r}"
            )
    from neuron_serve.model.quantization import LINEAR_LAYERS  # lazily: recipes load without torch

    known = ("embed_tokens", *LINEAR_LAYERS)
    for entry in q.skip:
        if entry.rsplit(".", 1)[-1] not in known:
            errors.append(
                f"quantization.skip: {entry!r} names no layer; a name or path ending in one of {', '.join(known)}"
            )


def _check_group_divides(errors: list[str], r: Recipe, config: HeadCounts) -> None:
    """int4 groups must not straddle a rank's inputs: every layer's inputs per rank divide into groups."""
    group, tp = r.quantization.group_size, r.target.tp_degree
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden or 0) // config.num_attention_heads
    inputs = {
        "hidden_size": hidden,
        "attention heads x head_dim / tp_degree": _per_rank(config.num_attention_heads * head_dim, tp),
        "intermediate_size / tp_degree": _per_rank(getattr(config, "intermediate_size", None), tp),
    }
    for what, size in inputs.items():
        if size and size % group:
            errors.append(f"quantization.group_size: {group} does not divide the model's {what} ({size})")


def _per_rank(size: int | None, tp: int) -> int | None:
    return size // tp if size and size % tp == 0 else None


# The rules of each target's own fields; a target kind is valid when it has rules here.
def _neuron_model_errors(r: Recipe, config: ModelConfig) -> list[str]:
    """What a neuron recipe's model decides: the NKI MLP kernel's tiles, and the memory of one core."""
    inter = config.intermediate_size // r.target.tp_degree
    if "swiglu_mlp" in r.kernels.enabled and inter % 128:
        return [
            f"kernels.enabled: the NKI 'swiglu_mlp' kernel tiles each rank's intermediate size by 128; "
            f"{config.intermediate_size} / tp_degree {r.target.tp_degree} = {inter} is not a multiple"
        ]
    return memory_errors(r, config)


TARGET_RULES = {"cpu": _check_cpu_target, "neuron": _check_neuron_target}
TARGET_KINDS = tuple(TARGET_RULES)
# Rules of a target that need the whole model config, judged on an otherwise valid recipe: on neuron, the
# kernels' tiles and a NeuronCore's HBM (the host's memory is not checked).
TARGET_MODEL_RULES = {"neuron": _neuron_model_errors}


def check_heads(errors: list[str], tp: int, config: HeadCounts) -> None:
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % tp:
        errors.append(f"target.tp_degree: the model's {heads} attention heads are not divisible by {tp}")
    # Fewer KV heads than ranks works by replicating each KV head (NxD's REPLICATE_TO_TP_DEGREE).
    if kv % tp and not (kv < tp and tp % kv == 0):
        errors.append(
            f"target.tp_degree: the model's {kv} KV heads must be divisible by {tp}, or (when fewer "
            f"than {tp}) divide it so each KV head can be replicated; {kv} does neither"
        )


def _check_serve(errors: list[str], s: ServeSection) -> None:
    if not s.host:
        errors.append("serve.host: must not be empty")
    if not 1 <= s.port <= 65535:
        errors.append(f"serve.port: must be in 1..65535, got {s.port}")
    _at_least(errors, "serve.workers", s.workers, 1)
    _at_least(errors, "serve.max_waiting", s.max_waiting, 1)
    _at_least(errors, "serve.max_tokens_default", s.max_tokens_default, 1)
    _at_least(errors, "serve.max_tokens_cap", s.max_tokens_cap, 0)
    if s.max_tokens_cap and s.max_tokens_default > s.max_tokens_cap:
        errors.append(
            f"serve.max_tokens_default: must be at most serve.max_tokens_cap ({s.max_tokens_cap}), "
            f"got {s.max_tokens_default}"
        )
    _at_least(errors, "serve.graceful_timeout_s", s.graceful_timeout_s, 0)
    if s.prefill_order not in PREFILL_ORDERS:
        errors.append(f"serve.prefill_order: must be one of {', '.join(PREFILL_ORDERS)}, got {s.prefill_order!r}")


def recipe_errors(recipe: Recipe, model_config: HeadCounts | None = None) -> list[str]:
    """Every rule the recipe breaks, one message each (empty when valid)."""
    r, errors = recipe, []
    if not _NAME_RE.match(r.name):
        errors.append(f"name: must be letters, digits, '.', '_' or '-' (it names files), got {r.name!r}")
    _at_least(errors, "version", r.version, 1)
    _check_model(errors, r)
    _one_of(errors, "target.kind", r.target.kind, TARGET_KINDS)
    _at_least(errors, "target.tp_degree", r.target.tp_degree, 1)
    if r.target.kind in TARGET_RULES:
        TARGET_RULES[r.target.kind](errors, r)
    if model_config is not None and r.target.tp_degree >= 1:
        check_heads(errors, r.target.tp_degree, model_config)
    _check_shapes(errors, r.shapes)
    kernels = known_kernels()
    for k in r.kernels.enabled:
        if k not in kernels:
            errors.append(f"kernels.enabled: unknown kernel {k!r}; known: {', '.join(kernels)}")
    if len(set(r.kernels.enabled)) != len(r.kernels.enabled):
        errors.append(f"kernels.enabled: names must not repeat, got {r.kernels.enabled}")
    _check_quantization(errors, r)
    if model_config is not None and r.quantization.method == "int4-weight" and r.target.tp_degree >= 1:
        _check_group_divides(errors, r, model_config)
    _check_compiler(errors, r.compiler)
    _check_serve(errors, r.serve)
    # Memory needs a whole config (heads alone do not size the weights), and is judged only on an
    # otherwise valid recipe: its arithmetic assumes a known instance and heads that split.
    if isinstance(model_config, ModelConfig) and not errors and r.target.kind in TARGET_MODEL_RULES:
        errors += TARGET_MODEL_RULES[r.target.kind](r, model_config)
    return errors


def validate_recipe(recipe: Recipe, model_config: HeadCounts | None = None) -> None:
    """Raise RecipeError listing every broken rule; return None when the recipe is valid."""
    errors = recipe_errors(recipe, model_config)
    if errors:
        raise RecipeError(errors, source=f"recipe {recipe.name!r}")
