"""Our `LlamaModel` with neuronx-distributed's parallel linear layers, for tracing with ModelBuilder.

The model code is the CPU path's (``model/llama.py``); only its linear layers change:

- q/k/v and gate/up become ``ColumnParallelLinear(gather_output=False)``, o and down become
  ``RowParallelLinear(input_is_parallel=True)``. Each layer knows its partition dimension and a
  row-parallel layer all-reduces its own output over the TP group, then adds its (unsharded) bias.
- Because the layers reduce, the model's own all-reduce must do nothing: the model is built with
  `LayerReducedTensorParallel`, whose `all_reduce` is the identity (the CPU path keeps its gloo one).
- With fewer KV heads than ranks each KV head is replicated (NxD Inference's REPLICATE_TO_TP_DEGREE):
  k/v are column-parallel over ``degree`` heads, and rank r holds KV head ``r // (degree // kv_heads)``,
  the head `sharding.kv_head_range` gives the CPU path, so one set of weight shards serves both.

Embeddings and lm_head stay plain (replicated), as on the CPU path. neuronx-distributed is imported
only when the default layer classes are needed; tests pass stand-ins with the same constructor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from neuron_serve.backends.neuron.quantization import quantize_parallel_layers
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.parallel import TensorParallel
from neuron_serve.model.quantization import QuantSpec
from neuron_serve.model.rope import rope_tables
from neuron_serve.model.sharding import COLUMN_PARALLEL, KV_PROJECTIONS, ROW_PARALLEL

LayerFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class LayerReducedTensorParallel(TensorParallel):
    """TP where the row-parallel layers all-reduce their own output (neuronx-distributed's
    RowParallelLinear does), so the model's explicit all-reduce is the identity."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class ParallelLinearSpec:
    """One linear layer to replace. Sizes are the full (unsharded) ones, as the NxD constructors take
    them; each layer divides by the TP world size itself."""

    name: str  # module path in the model, e.g. "layers.0.self_attn.q_proj"
    style: str  # "column" | "row"
    input_size: int
    output_size: int
    bias: bool


def parallel_linear_plan(model: LlamaModel) -> list[ParallelLinearSpec]:
    """Which of the model's linear layers become column- or row-parallel, with their full sizes.

    The model is built at its TP degree, so each nn.Linear already has its per-rank size; the full
    size is that times the degree (for replicated KV heads: ``degree`` heads, one per rank).
    """
    degree = model.tp.degree
    plan = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(module, nn.Linear) or leaf not in (*COLUMN_PARALLEL, *KV_PROJECTIONS, *ROW_PARALLEL):
            continue
        bias = module.bias is not None
        if leaf in ROW_PARALLEL:
            plan.append(ParallelLinearSpec(name, "row", module.in_features * degree, module.out_features, bias))
        else:
            plan.append(ParallelLinearSpec(name, "column", module.in_features, module.out_features * degree, bias))
    return plan


def nxd_layer_classes() -> tuple[LayerFactory, LayerFactory]:
    from neuronx_distributed.parallel_layers.layers import ColumnParallelLinear, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear


def to_parallel_layers(
    model: LlamaModel, column_cls: LayerFactory | None = None, row_cls: LayerFactory | None = None
) -> LlamaModel:
    """Replace the model's q/k/v/o and gate/up/down layers in place (see `parallel_linear_plan`).

    Must run where the NxD TP world is set up (inside ModelBuilder's module factory): the layers read
    the world size from ``parallel_state``. A world size that disagrees with ``model.tp.degree``
    shows up as a shape mismatch, reported here rather than as a wrong graph.
    """
    if column_cls is None or row_cls is None:
        column_cls, row_cls = nxd_layer_classes()
    dtype = model.embed_tokens.weight.dtype
    for spec in parallel_linear_plan(model):
        parent_name, _, leaf = spec.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, leaf)
        if spec.style == "column":
            new = column_cls(spec.input_size, spec.output_size, bias=spec.bias, gather_output=False, dtype=dtype)
        else:
            new = row_cls(spec.input_size, spec.output_size, bias=spec.bias, input_is_parallel=True, dtype=dtype)
        if new.weight.shape != old.weight.shape:
            raise ValueError(
                f"{spec.name}: the {spec.style}-parallel layer holds {tuple(new.weight.shape)} per rank, the model "
                f"expects {tuple(old.weight.shape)}: the NxD TP world size differs from tp_degree {model.tp.degree}"
            )
        setattr(parent, leaf, new)
    return model


def build_parallel_model(
    config: ModelConfig,
    max_seq_len: int,
    degree: int,
    dtype: torch.dtype,
    column_cls: LayerFactory | None = None,
    row_cls: LayerFactory | None = None,
    kernels: frozenset[str] = frozenset(),
    quantization: QuantSpec | None = None,
) -> LlamaModel:
    """The model as one NeuronCore of a TP group of ``degree`` sees it, using the fused ``kernels``
    (their NKI versions, `nki_kernels.registry`),
    its parallel layers NxD's quantized ones when `quantization` says (weights are placeholders:
    ModelBuilder traces without them, the runner gives each rank its shard)."""
    model = LlamaModel(config, max_seq_len, LayerReducedTensorParallel(degree, 0), kernels, "neuron").to(dtype)
    # RoPE tables stay float32, as on the CPU path (`_run_layers` casts after indexing them).
    model.rope_cos, model.rope_sin = rope_tables(config, max_seq_len)
    model = to_parallel_layers(model, column_cls, row_cls)
    return quantize_parallel_layers(model, quantization or QuantSpec()).eval()
