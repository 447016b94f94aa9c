"""Quantized weights on NeuronCores: neuronx-distributed's quantized parallel layers, set up from a
recipe's ``[quantization]``.

The weights are quantized once, at compile time, into the per-rank shards (``model/quantization.py``),
in the layout NxD's layers hold: ``weight`` int8 or float8_e4m3fn and ``scale`` fp32 ``[out, 1]``, the
scale cut with a column-parallel layer's rows and whole on every rank of a row-parallel one
(neuronx-distributed 2.29 at commit fbac349b, ``quantization/quantization_layers.py``
``_setup_for_scale``). The traced
model swaps each ColumnParallelLinear/RowParallelLinear for QuantizedColumnParallel/QuantizedRowParallel
with NxD's ``convert`` (``quantization/quantize.py``: ``convert(module, q_config, inplace, mapping,
include, modules_to_not_convert)``, names matched as substrings), as NxD Inference's model wrapper does
(NxDI 0.7, ``models/model_wrapper.py``). lm_head and the embeddings are plain replicated layers there,
which ``convert`` leaves alone: on neuron they stay in the model's dtype.

`nxdi_neuron_config` gives the same setting as NxD Inference's NeuronConfig fields
(``models/config.py``), for a user moving a deployment between the two stacks.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from torch import nn

from neuron_serve.model.quantization import QuantSpec

# Our method -> NxD's QuantizedDtype name (``quantization_config.py``; looked up upper-cased).
NXD_DTYPES = {"int8-weight": "int8", "fp8-weight": "f8e4m3"}
PER_CHANNEL = "per_channel_symmetric"
# NxDI adds it whenever weights are fp8 (model_wrapper.py): Neuron's e4m3 has no inf/nan encodings.
FP8_COMPILER_FLAG = "--experimental-unsafe-fp8e4m3fn-as-fp8e4m3"


def nxdi_neuron_config(spec: QuantSpec) -> dict:
    """NxD Inference NeuronConfig keyword arguments for `spec` (empty when it quantizes nothing)."""
    if not spec.enabled:
        return {}
    return {
        "quantized": True,
        "quantization_type": PER_CHANNEL,
        "quantization_dtype": NXD_DTYPES[spec.method],
        "modules_to_not_convert": list(spec.skip),
    }


def nxd_q_config(spec: QuantSpec, config_module: ModuleType | None = None) -> dict:
    """NxD's q_config for `spec`: its per-channel default with our dtype, set as NxD Inference sets it
    (model_wrapper.py at NxDI commit 4bcdc54; each layer picks its own channel axis)."""
    if config_module is None:
        from neuronx_distributed.quantization import quantization_config as config_module
    q_config = config_module.get_default_per_channel_custom_qconfig_dict()
    q_config["quantized_dtype"] = config_module.QuantizedDtype.get_dtype(NXD_DTYPES[spec.method])
    return q_config


def compiler_flags(spec: QuantSpec) -> list[str]:
    return [FP8_COMPILER_FLAG] if spec.method == "fp8-weight" else []


def quantize_parallel_layers(
    model: nn.Module,
    spec: QuantSpec,
    convert: Callable[..., nn.Module] | None = None,
    config_module: ModuleType | None = None,
) -> nn.Module:
    """Swap the model's parallel linear layers for NxD's quantized ones (in place)."""
    if not spec.enabled:
        return model
    if convert is None:
        from neuronx_distributed.quantization.quantize import convert
    q_config = nxd_q_config(spec, config_module)
    return convert(model, q_config=q_config, inplace=True, mapping=None, modules_to_not_convert=list(spec.skip))
