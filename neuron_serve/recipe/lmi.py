"""Import a SageMaker LMI / DJL Serving ``serving.properties`` (transformers-neuronx engine) as a recipe.

Every option is either mapped onto a recipe field or listed in the notes with the reason it has no
equivalent: nothing is dropped silently. Option names and value sets follow the LMI
Transformers-NeuronX user guide and djl_python's ``tnx_properties``.
"""

from __future__ import annotations

import re
from pathlib import Path

from neuron_serve.recipe.instances import get_instance
from neuron_serve.recipe.schema import (
    CompilerSection,
    ModelSection,
    QuantizationSection,
    Recipe,
    ServeSection,
    ShapesSection,
    TargetSection,
)

DEFAULT_INSTANCE = "inf2.48xlarge"
LMI_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# LMI defaults used when an option is absent (djl_python properties: n_positions 128,
# max_rolling_batch_size 32, dtype fp32, tensor_parallel_degree 1).
LMI_DEFAULTS = {
    "n_positions": "128",
    "max_rolling_batch_size": "32",
    "dtype": "fp32",
    "tensor_parallel_degree": "1",
}

# Options with no equivalent, and why.
NO_EQUIVALENT = {
    "entryPoint": "neuron-serve runs its own Llama-family model code; there are no custom entry points",
    "trust_remote_code": "no remote code is ever run; the model must be a supported Llama-family model",
    "revision": "models are never downloaded from a hub, so there is no revision to pick",
    "model_loading_timeout": "workers load precompiled artifacts; gunicorn's timeouts come from [serve]",
    "enable_streaming": "streaming is per request (`stream: true`) and always available",
    "output_formatter": "responses follow the OpenAI and SageMaker route formats",
    "load_split_model": "weights are loaded and sharded by `neuron-serve compile`",
    "low_cpu_mem_usage": "weights are loaded once, as shards, by `neuron-serve compile`",
    "unroll": "transformers-neuronx graph setting; graphs are traced by neuronx-distributed here",
    "compiled_graph_path": "transformers-neuronx NEFFs cannot be reused; `neuron-serve compile` builds "
    "its own artifacts (and uses the compile cache)",
    "group_query_attention": "KV heads are sharded, or replicated when fewer than tp_degree, automatically",
    "speculative_draft_model": "speculative decoding is not supported",
    "draft_model_id": "speculative decoding is not supported",
    "speculative_length": "speculative decoding is not supported",
    "enable_lora": "LoRA adapters are not supported",
}
# option.quantize values of LMI's Neuron engine (djl_python tnx_properties.py TnXQuantizeMethods at
# djl-serving afece25d: static_int8 only, i.e. transformers-neuronx's int8 weights, QuantizationConfig
# quant_dtype "s8", one scale per output channel) and the boolean options that mean the same.
LMI_QUANTIZE = {"static_int8": "int8-weight"}
LMI_INT8_FLAGS = ("load_in_8bit", "neuron_quant")
# Options that become neuronx-cc flags (both are real neuronx-cc compile flags).
FLAG_OPTIONS = {
    "enable_mixed_precision_accumulation": "--enable-mixed-precision-accumulation",
    "enable_saturate_infinity": "--enable-saturate-infinity",
}


def parse_properties(text: str) -> dict[str, str]:
    """Java .properties as DJL writes them: ``key=value`` or ``key: value``; ``#``/``!`` comments."""
    props: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        match = re.match(r"^([^=:\s]+)\s*[=:]\s*(.*)$", line)
        if not match:
            raise ValueError(f"serving.properties: cannot parse line {raw!r} (expected key=value)")
        props[match.group(1)] = match.group(2).strip()
    return props


def ladder(start: int, end: int) -> list[int]:
    """Powers of two from ``start`` (rounded up) below ``end``, then ``end`` itself."""
    rungs, b = [], 1
    while b < start:
        b *= 2
    while b < end:
        rungs.append(b)
        b *= 2
    return [*rungs, end]


def _is_hub_id(model_id: str) -> bool:
    # "org/name" with no path markers is how LMI names a Hugging Face hub model.
    if model_id.startswith(("s3://", "/", "./", "../", "~")) or model_id.endswith(".gguf"):
        return False
    return bool(re.match(r"^[\w.-]+/[\w.-]+$", model_id)) and not Path(model_id).exists()


def _recipe_name(model_id: str, instance: str) -> str:
    base = model_id.rstrip("/").rsplit("/", 1)[-1] or "model"
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._").lower() or "model"
    return f"{base}-{instance}"


def _int(opts: dict[str, str], key: str, prefix: str = "option.") -> int:
    value = opts.get(key, LMI_DEFAULTS.get(key, ""))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"serving.properties: {prefix}{key} must be an integer, got {value!r}") from None


def _source(model_id: str, notes: list[str]) -> str:
    if _is_hub_id(model_id):
        notes.append(
            f"option.model_id={model_id}: kept as model.source, but it is a Hugging Face hub id and "
            "neuron-serve never downloads from a hub; download it first (to a local dir or S3) and "
            "point model.source there"
        )
    return model_id


def _tp_degree(opts: dict[str, str], cores: int, instance: str, notes: list[str]) -> int:
    if opts.get("tensor_parallel_degree") == "max":
        notes.append(f"option.tensor_parallel_degree=max: all {cores} NeuronCores of {instance}")
        return cores
    return _int(opts, "tensor_parallel_degree")


def _context_buckets(opts: dict[str, str], n_positions: int, notes: list[str]) -> list[int]:
    raw = opts.get("context_length_estimate")
    if not raw:
        notes.append(f"option.context_length_estimate not set: context buckets are powers of two up to {n_positions}")
        return ladder(min(128, n_positions), n_positions)
    try:
        # "256,512" as documented; newer LMI releases parse the value as JSON ("[256, 512]").
        given = [int(v) for v in raw.strip("[] ").split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"serving.properties: option.context_length_estimate must be integers separated by commas, got {raw!r}"
        ) from None
    buckets = sorted({b for b in given if 0 < b <= n_positions})
    if buckets != given:
        notes.append(
            f"option.context_length_estimate={raw}: sorted, de-duplicated and limited to "
            f"option.n_positions ({n_positions}): {buckets}"
        )
    return buckets or [n_positions]


def _batch_size(opts: dict[str, str], notes: list[str]) -> int:
    rolling, static = opts.get("max_rolling_batch_size"), opts.get("batch_size")
    if rolling is None and static is not None:
        notes.append(f"option.batch_size={static}: used as shapes.batch_size (continuous-batching slots)")
        return _int(opts, "batch_size")
    if static is not None:
        notes.append(f"option.batch_size={static}: not carried over: slots come from max_rolling_batch_size")
    if rolling is None:
        notes.append("option.max_rolling_batch_size not set: LMI's default of 32 slots used")
    return _int(opts, "max_rolling_batch_size")


def _compiler(opts: dict[str, str], dtype: str, notes: list[str]) -> CompilerSection:
    c = CompilerSection(optlevel=_int(opts, "neuron_optimize_level") if "neuron_optimize_level" in opts else 2)
    if dtype == "float32":
        # LMI runs fp32 models in fp32 (amp = f32); keep that rather than silently casting to bf16.
        c.auto_cast = "none"
        notes.append("option.dtype=fp32: compiled without auto-cast, as LMI does; consider bf16 for speed")
    elif dtype == "float16":
        c.auto_cast_type = "fp16"
    for key, flag in FLAG_OPTIONS.items():
        if opts.get(key, "").lower() == "true":
            c.extra_flags.append(flag)
    return c


def _quantization(opts: dict[str, str], notes: list[str]) -> QuantizationSection:
    method = "none"
    quantize = opts.get("quantize")
    if quantize is not None:
        if quantize in LMI_QUANTIZE:
            method = LMI_QUANTIZE[quantize]
            notes.append(f"option.quantize={quantize}: quantization.method = {method!r} (int8 weights per channel)")
        else:
            notes.append(
                f"option.quantize={quantize}: not carried over: LMI's Neuron engine takes only "
                f"{', '.join(LMI_QUANTIZE)}; set [quantization] method in the recipe instead (int8-weight, fp8-weight)"
            )
    for flag in LMI_INT8_FLAGS:
        if opts.get(flag, "").lower() == "true":
            method = "int8-weight"
            notes.append(f"option.{flag}=true: quantization.method = 'int8-weight' (int8 weights per channel)")
    return QuantizationSection(method=method)


def _other_options(props: dict[str, str], opts: dict[str, str], notes: list[str]) -> None:
    mapped = {
        "quantize",
        *LMI_INT8_FLAGS,
        "model_id",
        "tensor_parallel_degree",
        "n_positions",
        "max_rolling_batch_size",
        "batch_size",
        "dtype",
        "neuron_optimize_level",
        "context_length_estimate",
        "rolling_batch",
        *FLAG_OPTIONS,
    }
    rb = opts.get("rolling_batch")
    if rb is not None:
        notes.append(
            f"option.rolling_batch={rb}: neuron-serve always does continuous batching (LMI's rolling batch)"
            + ("; static batching ('disable') is not supported" if rb == "disable" else "")
        )
    for key, value in opts.items():
        if key in mapped:
            continue
        why = NO_EQUIVALENT.get(key, "no equivalent in neuron-serve")
        notes.append(f"option.{key}={value}: not carried over: {why}")
    for key, value in props.items():
        if key == "engine":
            notes.append(f"engine={value}: neuron-serve is its own engine (Flask + gunicorn + Neuron runtime)")
        elif not key.startswith("option.") and key != "job_queue_size":
            notes.append(f"{key}={value}: not carried over: no equivalent in neuron-serve")


def convert_lmi(
    path: str | Path, instance: str = DEFAULT_INSTANCE, name: str | None = None
) -> tuple[Recipe, list[str]]:
    """The recipe equivalent to a serving.properties, and a note for every option not carried over."""
    props = parse_properties(Path(path).read_text())
    opts = {k.removeprefix("option."): v for k, v in props.items() if k.startswith("option.")}
    notes: list[str] = []
    if not opts.get("model_id"):
        # LMI then loads the model files stored next to serving.properties (its model_dir).
        opts["model_id"] = str(Path(path).resolve().parent)
        notes.append(f"option.model_id not set: model.source is the model directory {opts['model_id']}")
    inst = get_instance(instance)
    notes.insert(0, f"target: kind neuron on {inst.name} (from --instance; serving.properties does not name one)")
    dtype_opt = opts.get("dtype", LMI_DEFAULTS["dtype"])
    if dtype_opt not in LMI_DTYPES:
        raise ValueError(f"serving.properties: option.dtype must be one of {', '.join(LMI_DTYPES)}, got {dtype_opt!r}")
    dtype = LMI_DTYPES[dtype_opt]
    n_positions = _int(opts, "n_positions")
    if "n_positions" not in opts:
        notes.append("option.n_positions not set: LMI's default of 128 tokens used as shapes.max_seq_len")
    context = _context_buckets(opts, n_positions, notes)
    tp = _tp_degree(opts, inst.neuron_cores, inst.name, notes)
    workers = max(1, inst.neuron_cores // tp)
    notes.append(
        f"serve.workers={workers}: one replica per {tp} NeuronCores, to use the {inst.neuron_cores} of {inst.name}"
    )
    serve = ServeSection(workers=workers)
    if "job_queue_size" in props:  # DJL's per-model request queue: our bounded waiting queue
        serve.max_waiting = _int(props, "job_queue_size", prefix="")
    recipe = Recipe(
        name=name or _recipe_name(opts["model_id"], inst.name),
        model=ModelSection(source=_source(opts["model_id"], notes), dtype=dtype),
        target=TargetSection(kind="neuron", instance=inst.name, tp_degree=tp),
        shapes=ShapesSection(
            batch_size=_batch_size(opts, notes),
            max_seq_len=n_positions,
            context_buckets=context,
            token_buckets=ladder(min(512, n_positions), n_positions),
        ),
        quantization=_quantization(opts, notes),
        compiler=_compiler(opts, dtype, notes),
        serve=serve,
    )
    _other_options(props, opts, notes)
    return recipe, notes
