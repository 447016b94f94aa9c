"""The recipe: the complete compile setting of one deployment, one TOML file in ``compile/``.

``[serve]`` holds serving-time settings only; everything else decides what ``compile`` produces
(``Recipe.compile_fields``), so two recipes with equal compile fields can share one artifact.

The files (``files.py``) and the rules (``validation.py``) are apart from these types, so that any
stage can hold a `Recipe` without loading TOML or validation code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

# Each name is the torch dtype of that name (`torch_dtype`).
DTYPES = ("float32", "bfloat16", "float16")
# `compile` replaces it with the target's best dtype (`Backend.resolve_dtype`); artifacts never hold it.
AUTO_DTYPE = "auto"
CPU_MODES = ("aot", "eager")
# Values accepted by neuronx-cc (Neuron Compiler CLI reference: --model-type, --auto-cast,
# --auto-cast-type, --optlevel).
MODEL_TYPES = ("generic", "transformer", "unet-inference")
AUTO_CASTS = ("none", "matmult", "all")
AUTO_CAST_TYPES = ("bf16", "fp16", "tf32", "fp8_e4m3")
OPTLEVELS = (1, 2, 3)
# `none` keeps model.dtype; the others are described in docs/ARCHITECTURE.md ("Quantization") and
# owned by model/quantization.py. Which target runs which: validation.QUANTIZATION_SUPPORT.
QUANTIZATION_METHODS = ("none", "int8-weight", "int4-weight", "int8-dynamic", "fp8-weight")
INT4_GROUP_SIZES = (32, 64, 128)


class RecipeError(ValueError):
    """One or more recipe problems; ``errors`` holds one message per problem."""

    def __init__(self, errors: list[str], source: str = "recipe"):
        self.errors = list(errors)
        super().__init__(f"{source} is invalid:\n" + "\n".join(f"  - {e}" for e in self.errors))


class HeadCounts(Protocol):
    """What validation needs from a model's config (an HF config or our own)."""

    num_attention_heads: int
    num_key_value_heads: int


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a name of DTYPES means."""
    import torch  # on use: a recipe loads without torch

    if name not in DTYPES:
        raise ValueError(f"model.dtype {name!r} names no dtype yet: `compile` resolves {AUTO_DTYPE!r} per machine")
    return getattr(torch, name)


@dataclass
class ModelSection:
    source: str = "default"
    dtype: str = "float32"
    # The model's config.json, relative to the recipe file, for a source whose own is out of reach (S3):
    # `recipe validate` checks heads and per-core memory against it; `compile` reads the source's own.
    config: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


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
    batch_buckets: list[int] = field(default_factory=list)  # [] = powers of two up to batch_size
    token_budget: int = 0  # tokens per engine step; 0 = batch_size + the largest context bucket


@dataclass
class KernelsSection:
    enabled: list[str] = field(default_factory=list)


@dataclass
class QuantizationSection:
    method: str = "none"
    group_size: int = 32  # int4-weight: inputs per scale and offset
    # Kept in model.dtype. lm_head by default: its logits feed sampling directly, and its error is
    # not averaged over layers. The embeddings are never quantized (a gather saves no time).
    skip: list[str] = field(default_factory=lambda: ["embed_tokens", "lm_head"])


@dataclass
class CompilerSection:
    cpu_mode: str = "aot"
    model_type: str = "transformer"
    auto_cast: str = "matmult"
    auto_cast_type: str = "bf16"
    optlevel: int = 2
    fast_loading: bool = True
    extra_flags: list[str] = field(default_factory=list)


PREFILL_ORDERS = ("arrival", "shortest-first")


@dataclass
class ServeSection:
    host: str = "127.0.0.1"  # an open endpoint is opted into (serve --host), never a default
    port: int = 8080
    workers: int = 1
    max_waiting: int = 256
    max_tokens_default: int = 256
    max_tokens_cap: int = 0  # the most tokens one request may ask for; 0 = what the context leaves
    graceful_timeout_s: int = 30
    prefill_order: str = "arrival"  # or "shortest-first" (engine/scheduler.py says how it orders prompts)


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
        """Everything that determines the compile output: all but name, version, [serve] and model.config."""
        d = self.to_dict()
        for key in ("name", "version", "serve"):
            del d[key]
        del d["model"]["config"]  # validation's input only: compile reads the source's own config.json
        return d
