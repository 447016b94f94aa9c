"""What one NeuronCore holds under a neuron recipe: one tensor-parallel rank's weights and KV cache, plus
the Neuron runtime's reserve, against the core's HBM (`core_memory`); a layout that does not fit is a
recipe error (`memory_errors`).

The shapes are the model's own. A rank's weights are those of `LlamaModel` built for that rank on the
meta device (nothing is allocated): q/k/v/o and the MLP split over tp_degree, one KV head per rank when
there are fewer KV heads than ranks, the embeddings, norms and lm_head whole on every rank; quantized
layers count as `quantize_weight` stores them. The KV cache is the rank's device-resident one: its own
KV heads, with a row per slot and the scratch row that pad tokens write (`KVCache.device_slots`).
"""

from __future__ import annotations

from dataclasses import dataclass

from neuron_serve.model.config import ModelConfig
from neuron_serve.recipe.instances import ALLOWED_TP_DEGREES, INSTANCES, Instance
from neuron_serve.recipe.schema import AUTO_DTYPE, Recipe

GIB = 1 << 30
# The Neuron runtime's own HBM on each core: model code (with 96 MB of micro-code per core), scratchpad,
# DMA rings and collectives buffers (Neuron docs, "Neuron device memory"). Their size depends on the
# graphs, so this is neuron-serve's allowance for them, not a figure that Neuron publishes.
RUNTIME_RESERVE = 1 * GIB


def hbm_per_core(instance: Instance) -> int:
    """Bytes of HBM per NeuronCore: 16 GiB on every inf2 and trn1 (NeuronCore-v2)."""
    return instance.accelerator_memory_gib * GIB // instance.neuron_cores


@dataclass(frozen=True)
class CoreMemory:
    """Bytes on one NeuronCore (TP rank 0, which also holds o_proj's bias)."""

    instance: str
    tp_degree: int
    dtype: str
    layer_weights: int  # this rank's share of the decoder layers
    replicated_weights: int  # embeddings, final norm and lm_head, whole on every rank
    kv_heads: int  # this rank's KV heads
    kv_rows: int  # slots, and the scratch row
    kv_cache: int
    hbm: int
    reserve: int = RUNTIME_RESERVE

    @property
    def weights(self) -> int:
        return self.layer_weights + self.replicated_weights

    @property
    def used(self) -> int:
        return self.weights + self.kv_cache + self.reserve

    @property
    def headroom(self) -> int:
        return self.hbm - self.used


def _weight_bytes(recipe: Recipe, config: ModelConfig) -> tuple[int, int]:
    """(decoder layers, the rest) of one rank's weights, in bytes."""
    import torch  # lazily: recipes load without torch
    from torch import nn

    from neuron_serve.model.llama import LlamaModel
    from neuron_serve.model.parallel import TensorParallel
    from neuron_serve.model.quantization import QuantSpec, quantize_weight

    spec = QuantSpec.of(recipe.quantization)
    with torch.device("meta"):
        model = LlamaModel(config, max_seq_len=1, tp=TensorParallel(recipe.target.tp_degree))
        quantized = {
            name: quantize_weight(module.weight, spec.for_layer(name))
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and spec.quantizes(name)
        }
    itemsize = recipe.model.torch_dtype.itemsize
    sizes = {name: sum(t.nbytes for t in stored.values()) for name, stored in quantized.items()}
    # named_parameters() yields a tied lm_head once, as the embeddings that it is.
    for name, param in model.named_parameters():
        if name.removesuffix(".weight") not in quantized:
            sizes[name] = param.numel() * itemsize
    layers = sum(size for name, size in sizes.items() if name.startswith("layers."))
    return layers, sum(sizes.values()) - layers


def core_memory(recipe: Recipe, config: ModelConfig) -> CoreMemory:
    """One NeuronCore's bytes under a valid neuron recipe whose model.dtype is set (not auto)."""
    from neuron_serve.model.kv_cache import KVCache  # lazily: recipes load without torch
    from neuron_serve.model.parallel import TensorParallel

    tp, shapes, dtype = recipe.target.tp_degree, recipe.shapes, recipe.model.torch_dtype
    kv_heads = TensorParallel(tp).local_kv_heads(config.num_key_value_heads)
    rows = KVCache.device_slots(shapes.batch_size)
    layers, replicated = _weight_bytes(recipe, config)
    return CoreMemory(
        instance=recipe.target.instance,
        tp_degree=tp,
        dtype=recipe.model.dtype,
        layer_weights=layers,
        replicated_weights=replicated,
        kv_heads=kv_heads,
        kv_rows=rows,
        kv_cache=KVCache.nbytes(config, rows, shapes.max_seq_len, kv_heads, dtype),
        hbm=hbm_per_core(INSTANCES[recipe.target.instance]),
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _remedies(recipe: Recipe) -> str:
    inst = INSTANCES[recipe.target.instance]
    higher = [d for d in ALLOWED_TP_DEGREES[inst.family] if recipe.target.tp_degree < d <= inst.neuron_cores]
    fixes = [f"raise target.tp_degree (to {' or '.join(map(str, higher))})"] if higher else []
    fixes.append("lower shapes.batch_size or shapes.max_seq_len")
    if recipe.quantization.method == "none":
        fixes.append("quantize the weights (quantization.method int8-weight or fp8-weight)")
    return ", or ".join(fixes)


def _unsized(recipe: Recipe) -> str | None:
    """Why a neuron recipe's memory cannot be sized yet (None: it can)."""
    if recipe.model.dtype == AUTO_DTYPE:
        return "model.dtype is auto, which `compile` resolves per target; name a dtype to check it"
    return None


def memory_errors(recipe: Recipe, config: ModelConfig) -> list[str]:
    """The per-core memory rule of neuron recipes that keep every other rule: a rank's weights, KV
    cache and the runtime reserve must fit in its core's HBM."""
    if _unsized(recipe):
        return []
    m = core_memory(recipe, config)
    if m.headroom >= 0:
        return []
    return [
        f"target.tp_degree: at tp_degree {m.tp_degree} one NeuronCore of {m.instance} needs {_gib(m.weights)} of "
        f"weights + {_gib(m.kv_cache)} of KV cache ({recipe.shapes.batch_size} slots and a scratch row x "
        f"{recipe.shapes.max_seq_len} tokens) + {_gib(m.reserve)} runtime reserve = {_gib(m.used)}, more than "
        f"its {_gib(m.hbm)} of HBM (by {_gib(-m.headroom)}); {_remedies(recipe)}"
    ]


def memory_report(recipe: Recipe, config: ModelConfig) -> str:
    """One NeuronCore's memory under a valid neuron recipe, as `recipe validate` prints it."""
    if why := _unsized(recipe):
        return f"Memory per NeuronCore: not checked: {why}"
    m, s = core_memory(recipe, config), recipe.shapes
    replicated = " (replicated: fewer KV heads than ranks)" if config.num_key_value_heads < m.tp_degree else ""
    rows = [
        ("weights", m.weights, f"{m.dtype}, quantization {recipe.quantization.method}"),
        ("  decoder layers", m.layer_weights, f"this rank's share of {config.num_hidden_layers} layers"),
        ("  replicated", m.replicated_weights, "embeddings, final norm and lm_head, whole on every core"),
        (
            "KV cache",
            m.kv_cache,
            f"K and V x {config.num_hidden_layers} layers x {m.kv_rows} rows ({s.batch_size} slots + scratch) x "
            f"{m.kv_heads} of {config.num_key_value_heads} KV heads{replicated} x {s.max_seq_len} tokens x "
            f"{config.head_dim} dims",
        ),
        ("runtime reserve", m.reserve, "neuron-serve's allowance for the Neuron runtime (code, scratchpad)"),
        ("total", m.used, ""),
        ("HBM", m.hbm, f"per NeuronCore of {m.instance}"),
        ("headroom", m.headroom, ""),
    ]
    lines = [f"Memory per NeuronCore (one of {m.tp_degree} TP ranks):"]
    lines += [f"  {name:<17}{_gib(size):>11}  {note}".rstrip() for name, size, note in rows]
    return "\n".join(lines)
