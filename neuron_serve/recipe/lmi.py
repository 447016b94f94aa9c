"""Import a SageMaker LMI / DJL Serving ``serving.properties`` (transformers-neuronx engine) as a recipe.

Every option is either mapped onto a recipe field or listed in the notes with the reason it has no
equivalent: nothing is dropped silently. Option names and value sets follow the LMI
Transformers-NeuronX user guide and djl_python's ``tnx_properties``. An absent option takes the value
LMI's Neuron engine would give it, some from the model's config.json (`NeuronSmartDefaults`); each
default applied is listed in the notes too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from neuron_serve.recipe.instances import Instance, get_instance
from neuron_serve.recipe.lmi_defaults import (
    LMI_DTYPE,
    MAX_ROLLING_BATCH,
    N_POSITIONS_CAP,
    NeuronSmartDefaults,
    config_int,
)
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
    "enable_saturate_infinity": "neuron recipes always pass --enable-saturate-infinity to neuronx-cc",
}
# option.quantize values of LMI's Neuron engine (djl_python tnx_properties.py TnXQuantizeMethods at
# djl-serving afece25d: static_int8 only, i.e. transformers-neuronx's int8 weights, QuantizationConfig
# quant_dtype "s8", one scale per output channel) and the boolean options that mean the same.
LMI_QUANTIZE = {"static_int8": "int8-weight"}
LMI_INT8_FLAGS = ("load_in_8bit", "neuron_quant")
# Options that become neuronx-cc flags (a real neuronx-cc compile flag).
FLAG_OPTIONS = {"enable_mixed_precision_accumulation": "--enable-mixed-precision-accumulation"}


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
    value = opts[key]
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


def _model_config(model_id: str, given: Path | None) -> tuple[dict[str, Any] | None, str]:
    """The model's config.json, and where it was read; or None, and why it is out of reach."""
    path = given or Path(model_id).expanduser() / "config.json"
    if given or path.is_file():
        return json.loads(path.read_text()), f"read from {path}"
    return None, f"no config.json at {model_id}; S3 and hub models are not read, pass --model-config"


def _smart_defaults(
    opts: dict[str, str], config: dict[str, Any] | None, unreachable: str, n_positions: int, inst: Instance
) -> tuple[NeuronSmartDefaults | None, str]:
    """LMI's heuristic for this model, or None and why it cannot run."""
    if config is None:
        return None, f"the model config is out of reach ({unreachable})"
    if "n_positions" not in opts and config_int(config, "max_position_embeddings") <= 0:
        return None, "the model config has no max_position_embeddings"  # applySmartDefaults returns early
    smart = NeuronSmartDefaults.of(config, n_positions, "quantize" in opts, inst)
    return smart, "" if smart else "the model config does not give the model's size"


def _dtype(opts: dict[str, str], notes: list[str]) -> str:
    value = opts.get("dtype")
    if value is None:
        value = LMI_DTYPE
        notes.append(f"option.dtype not set: {value}, as LMI's Neuron engine defaults")
    if value not in LMI_DTYPES:
        raise ValueError(f"serving.properties: option.dtype must be one of {', '.join(LMI_DTYPES)}, got {value!r}")
    return LMI_DTYPES[value]


def _n_positions(opts: dict[str, str], config: dict[str, Any] | None, unreachable: str, notes: list[str]) -> int:
    if "n_positions" in opts:
        return _int(opts, "n_positions")
    longest = config_int(config, "max_position_embeddings") if config else 0
    if longest > 0:
        n = min(longest, N_POSITIONS_CAP)
        notes.append(
            f"option.n_positions not set: {n} = min(max_position_embeddings {longest}, {N_POSITIONS_CAP}), "
            "LMI's default, as shapes.max_seq_len"
        )
        return n
    why = f"the model config is out of reach ({unreachable})" if config is None else "it has no max_position_embeddings"
    notes.append(
        f"option.n_positions not set: LMI's min(max_position_embeddings, {N_POSITIONS_CAP}) cannot be computed: "
        f"{why}. {N_POSITIONS_CAP} used, LMI's value when max_position_embeddings is unknown"
    )
    return N_POSITIONS_CAP


def _tp_degree(
    opts: dict[str, str], inst: Instance, smart: NeuronSmartDefaults | None, why: str, notes: list[str]
) -> int:
    cores = inst.neuron_cores
    value = opts.get("tensor_parallel_degree")
    if value == "max":
        notes.append(f"option.tensor_parallel_degree=max: all {cores} NeuronCores of {inst.name}")
        return cores
    if value is not None:
        return _int(opts, "tensor_parallel_degree")
    if smart is None:
        notes.append(
            f"option.tensor_parallel_degree not set: LMI's memory heuristic cannot run: {why}. All {cores} "
            f"NeuronCores of {inst.name} used, LMI's 'max' then"
        )
        return cores
    tp = smart.tp_degree(_int(opts, "max_rolling_batch_size") if "max_rolling_batch_size" in opts else None)
    notes.append(
        f"option.tensor_parallel_degree not set: {tp}, by LMI's memory heuristic (model {smart.model_gb:.1f} GB, "
        f"{smart.sequence_gb:.2f} GiB per sequence, {smart.memory_per_core:.0f} GiB per NeuronCore)"
    )
    return tp


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


def _batch_size(opts: dict[str, str], tp: int, smart: NeuronSmartDefaults | None, why: str, notes: list[str]) -> int:
    rolling, static = opts.get("max_rolling_batch_size"), opts.get("batch_size")
    if rolling is None and static is not None:
        notes.append(f"option.batch_size={static}: used as shapes.batch_size (continuous-batching slots)")
        return _int(opts, "batch_size")
    if static is not None:
        notes.append(f"option.batch_size={static}: not carried over: slots come from max_rolling_batch_size")
    if rolling is not None:
        return _int(opts, "max_rolling_batch_size")
    fits = smart.batch_size(tp) if smart else 0
    if fits:
        notes.append(f"option.max_rolling_batch_size not set: {fits} slots, LMI's memory heuristic at tp_degree {tp}")
        return fits
    why = why or f"no sequence fits beside the model at tp_degree {tp}"
    notes.append(
        f"option.max_rolling_batch_size not set: LMI's memory heuristic gives no batch size: {why}. "
        f"LMI's default of {MAX_ROLLING_BATCH} slots used"
    )
    return MAX_ROLLING_BATCH


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
    path: str | Path, instance: str = DEFAULT_INSTANCE, name: str | None = None, model_config: Path | None = None
) -> tuple[Recipe, list[str]]:
    """The recipe equivalent to a serving.properties, and a note for every option not carried over and
    every default applied. `model_config`: the model's config.json, where option.model_id has none."""
    props = parse_properties(Path(path).read_text())
    return convert_properties(props, Path(path).resolve().parent, instance, name, model_config)


def convert_properties(
    props: dict[str, str],
    model_dir: Path,
    instance: str = DEFAULT_INSTANCE,
    name: str | None = None,
    model_config: Path | None = None,
) -> tuple[Recipe, list[str]]:
    """`convert_lmi` for properties already read; `model_dir` is where serving.properties lies."""
    opts = {k.removeprefix("option."): v for k, v in props.items() if k.startswith("option.")}
    notes: list[str] = []
    if not opts.get("model_id"):
        # LMI then loads the model files stored next to serving.properties (its model_dir).
        opts["model_id"] = str(model_dir)
        notes.append(f"option.model_id not set: model.source is the model directory {opts['model_id']}")
    inst = get_instance(instance)
    notes.insert(0, f"target: kind neuron on {inst.name} (from --instance; serving.properties does not name one)")
    config, config_source = _model_config(opts["model_id"], model_config)
    if config is not None:
        notes.append(f"model config: {config_source}, for LMI's defaults that depend on the model")
    dtype = _dtype(opts, notes)
    n_positions = _n_positions(opts, config, config_source, notes)
    context = _context_buckets(opts, n_positions, notes)
    smart, why = _smart_defaults(opts, config, config_source, n_positions, inst)
    tp = _tp_degree(opts, inst, smart, why, notes)
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
            batch_size=_batch_size(opts, tp, smart, why, notes),
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
