"""Weight quantization: a quantized linear layer's stored tensors, how a float weight becomes them, and
the layer that computes with them.

The stored layout is NxD Inference's, so that a neuron artifact's shards load into its quantized
layers as they are (neuronx-distributed 2.29, ``quantization/quantization_layers.py``
``_setup_for_scale``; NxDI 0.7 ``application_base.py`` ``prepare_quantized_state_dict``):

- int8 and fp8, one scale per output channel: ``<layer>.weight`` int8 or float8_e4m3fn ``[out, in]``
  and ``<layer>.scale`` fp32 ``[out, 1]``; the weight is ``weight * scale``. The column-parallel split
  cuts the scale with the weight's rows; under the row-parallel split every rank keeps the whole scale
  and applies it to its partial sum (``sharding.py``).
- int4, one scale and offset per group of `group_size` inputs: ``<layer>.weight`` uint8 ``[out, in/2]``
  (two codes per byte, ``pack_int4``), ``<layer>.scale`` and ``<layer>.zero`` fp16 ``[out, in/group]``;
  the weight is ``code * scale + zero``, GGUF Q4_1's form (fp16 included), so GGUF Q4_0/Q4_1 tensors
  keep their codes. fp32 scales would be a third of the bytes a group of 32 reads, fp16 a fifth.
  Under ``int4-weight``, lm_head is stored as ``int8-weight`` (``QuantSpec.for_layer``).

Only linear layers are quantized. The embeddings are a gather of one row per token: quantizing them
would save memory but no time, so they stay in the model's dtype whatever `skip` says.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from neuron_serve.model import cpu_kernels, quant_ops
from neuron_serve.model.linear import Linear

LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
INT8_MAX = 127
# Neuron's FP8 E4M3 saturates at 240, not OCP e4m3fn's 448 (neuronx-distributed 2.29,
# quantization/README_rescaling_fp8_for_neuron.md; DtypeBound.F8E4M3_MAX).
FP8_E4M3_MAX = 240.0
INT4_LEVELS = 15
# lm_head under int4-weight, as llama.cpp's Q4 files keep their output tensor at 6 or 8 bits: its error
# reaches the logits directly instead of being averaged over layers. On the default model (`neuron-serve
# eval`), int4 on lm_head costs 6 % perplexity where the goal is 5 %; int8 there costs 0.3 %.
INT4_LM_HEAD_METHOD = "int8-weight"
# The methods with a CPU kernel (``quant_ops``), which takes several layers' weights in one call
# (q/k/v, gate/up): each call has a fixed cost (a parallel region; ~70 us for fbgemm's dynamic linear),
# a large share of a small layer's time.
_GROUPED = ("int8-weight", "int8-dynamic", "int4-weight")


@dataclass(frozen=True)
class QuantSpec:
    """A recipe's ``[quantization]``: the method, the int4 group size, and the layers kept in full
    precision (a layer name such as ``lm_head`` or ``down_proj``, or a full path such as
    ``layers.0.mlp.down_proj``)."""

    method: str = "none"
    group_size: int = 32
    skip: tuple[str, ...] = ("embed_tokens", "lm_head")

    @classmethod
    def of(cls, section) -> QuantSpec:
        """From a recipe's QuantizationSection (anything with its three fields)."""
        return cls(section.method, section.group_size, tuple(section.skip))

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def quantizes(self, layer: str) -> bool:
        leaf = layer.rsplit(".", 1)[-1]
        return self.enabled and leaf in LINEAR_LAYERS and layer not in self.skip and leaf not in self.skip

    def for_layer(self, layer: str) -> QuantSpec:
        """The spec that `layer` (a name such as ``lm_head`` or ``layers.0.mlp.up_proj``) is stored in."""
        if self.method == "int4-weight" and layer.rsplit(".", 1)[-1] == "lm_head":
            return replace(self, method=INT4_LM_HEAD_METHOD)
        return self


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """One float weight [out, in] -> its stored tensors, by suffix (``weight``, ``scale``, ``zero``)."""
    w = weight.float()
    if spec.method in ("int8-weight", "int8-dynamic"):
        scale = (w.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp(min=1e-12)
        return {"weight": torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), "scale": scale}
    if spec.method == "fp8-weight":
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_E4M3_MAX).clamp(min=1e-5)
        return {"weight": (w / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), "scale": scale}
    if spec.method == "int4-weight":
        out, inputs = w.shape
        groups = w.reshape(out, inputs // spec.group_size, spec.group_size)
        low = groups.amin(dim=-1).half()
        # fp16's smallest normal number, so that a constant group's scale survives the cast
        scale = ((groups.amax(dim=-1) - low.float()) / INT4_LEVELS).clamp(min=2**-14).half()
        codes = torch.round((groups - low.float()[..., None]) / scale.float()[..., None]).clamp(0, INT4_LEVELS)
        return {"weight": quant_ops.pack_int4(codes.reshape(out, inputs)), "scale": scale, "zero": low}
    raise ValueError(f"quantization.method {spec.method!r} has no quantizer")


def dequantize(stored: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """The float weight [out, in] that a layer's stored tensors stand for."""
    if spec.method == "int4-weight":
        codes = quant_ops.unpack_int4(stored["weight"]).float()
        out, inputs = codes.shape
        scale, zero = stored["scale"].float()[..., None], stored["zero"].float()[..., None]
        groups = codes.reshape(out, -1, spec.group_size) * scale + zero
        return groups.reshape(out, inputs)
    return stored["weight"].float() * stored["scale"]


def dequantize_state_dict(
    state_dict: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The state dict, in `dtype`, that a quantized one stands for."""
    layers = {name.removesuffix(".scale") for name in state_dict if name.endswith(".scale")}
    floats = {n: t for n, t in state_dict.items() if n.rsplit(".", 1)[0] not in layers}
    for layer in layers:
        stored = {s: state_dict[f"{layer}.{s}"] for s in ("weight", "scale", "zero") if f"{layer}.{s}" in state_dict}
        floats[f"{layer}.weight"] = dequantize(stored, spec.for_layer(layer)).to(dtype)
    return floats


def quantize_state_dict(
    state_dict: dict[str, torch.Tensor], spec: QuantSpec, kept: dict[str, dict[str, torch.Tensor]] | None = None
) -> dict[str, torch.Tensor]:
    """The state dict with every layer that `spec` quantizes replaced by its stored tensors. `kept`
    maps a layer to int4 codes it already has (a GGUF source's own), used where the layer is int4.
    A tied lm_head is quantized from the embeddings, which stay."""
    if not spec.enabled:
        return dict(state_dict)
    kept = kept or {}
    state = dict(state_dict)
    if spec.quantizes("lm_head") and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    for name in [n for n in state if n.endswith(".weight")]:
        layer = name.removesuffix(".weight")
        if spec.quantizes(layer):
            layer_spec = spec.for_layer(layer)
            own = kept.get(layer) if layer_spec.method == "int4-weight" else None
            stored = own or quantize_weight(state[name], layer_spec)
            state.update({f"{layer}.{suffix}": tensor for suffix, tensor in stored.items()})
    return state


class QuantizedLinear(nn.Module):
    """A linear layer on stored quantized tensors (see the module docstring), bias in full precision."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: bool, dtype: torch.dtype):
        super().__init__()
        load_kernels(spec)
        self.method, self.group_size = spec.method, spec.group_size
        self.in_features, self.out_features = in_features, out_features
        for suffix, tensor in _stored_like(out_features, in_features, spec).items():
            self.register_buffer(suffix, tensor)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = self._matmul(rows)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if self.method in _GROUPED:
            return _kernel(rows, (self,))
        # fp8 (a neuron method; on the CPU only `neuron-serve eval` computes with it, dequantized):
        # the weight widened in the graph, weight @ x^T as `Linear` computes it, the scale on the output.
        return torch.mm(self.weight.to(rows.dtype), rows.t()).t() * self.scale.t().to(rows.dtype)


def _kernel(rows: torch.Tensor, layers: tuple[QuantizedLinear, ...]) -> torch.Tensor:
    """The layers' CPU kernel (``quant_ops``) on rows [M, in]: their outputs side by side."""
    first = layers[0]
    weights, scales = [m.weight for m in layers], [m.scale for m in layers]
    if first.method == "int8-weight":
        return torch.ops.neuron_serve.int8_weight_linear(rows, weights, scales)
    if first.method == "int8-dynamic":
        return torch.ops.neuron_serve.int8_dynamic_linear(rows, weights, scales)
    zeros = [m.zero for m in layers]
    return torch.ops.neuron_serve.int4_weight_linear(rows, weights, scales, zeros, first.group_size)


def bf16_copy_bytes(state: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype) -> int:
    """Memory that the weight-only kernels take beside `state` (a rank's stored tensors): on bf16
    activations, a bf16 copy of each int8 or int4 layer, two bytes per weight, made on first use and
    kept (``kernels/weight_only_linear.cpp`` says why)."""
    if dtype != torch.bfloat16:
        return 0
    total = 0
    for layer in (name.removesuffix(".scale") for name in state if name.endswith(".scale")):
        method, weight = spec.for_layer(layer).method, state[f"{layer}.weight"]
        if method == "int8-weight":
            total += 2 * weight.numel()
        elif method == "int4-weight":
            total += 4 * weight.numel()  # two codes per byte
    return total


def load_kernels(spec: QuantSpec) -> None:
    """Make `spec`'s CPU kernel callable: before a model of it is traced, or its compiled graph runs."""
    if spec.method in ("int8-weight", "int4-weight"):
        cpu_kernels.load()


def _stored_like(out: int, inputs: int, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Empty stored tensors of a layer's shapes (on the current default device)."""
    if spec.method == "int4-weight":
        groups = inputs // spec.group_size
        return {
            "weight": torch.empty(out, inputs // 2, dtype=torch.uint8),
            "scale": torch.empty(out, groups, dtype=torch.float16),
            "zero": torch.empty(out, groups, dtype=torch.float16),
        }
    dtype = torch.float8_e4m3fn if spec.method == "fp8-weight" else torch.int8
    return {"weight": torch.empty(out, inputs, dtype=dtype), "scale": torch.empty(out, 1)}


def linear_group(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """Several layers applied to the same input, in one kernel call where their method allows it."""
    first = layers[0]
    grouped = isinstance(first, QuantizedLinear) and first.method in _GROUPED
    alike = all(isinstance(m, QuantizedLinear) and m.bias is None and m.method == first.method for m in layers)
    if not grouped or not alike:
        return [layer(x) for layer in layers]
    out = _kernel(x.reshape(-1, x.shape[-1]), layers)
    parts = out.split([m.out_features for m in layers], dim=-1)
    return [part.reshape(*x.shape[:-1], part.shape[-1]) for part in parts]


def quantize_modules(model: nn.Module, spec: QuantSpec) -> None:
    """Replace, in place, each linear layer that `spec` quantizes by a `QuantizedLinear` of its shape
    (built on the current default device: meta, before the stored tensors are assigned)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear) and spec.quantizes(name):
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            bias = module.bias is not None
            layer_spec = spec.for_layer(name)
            layer = QuantizedLinear(module.in_features, module.out_features, layer_spec, bias, module.weight.dtype)
            setattr(parent, attribute, layer)
