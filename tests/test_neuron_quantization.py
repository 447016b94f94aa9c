"""The neuron backend's quantization settings: NxD's q_config, NxD Inference's NeuronConfig fields and
the compiler flag, from a recipe's [quantization].

`quantization_config` below stands in for neuronx_distributed.quantization.quantization_config, which
cannot be installed here; it is written from its source (neuronx-distributed 2.29, commit fbac349b):
QuantizedDtype maps upper-cased names to torch dtypes, and the per-channel default dict has these keys.
"""

from __future__ import annotations

import enum
import types

import pytest
import torch
from conftest import tiny_recipe
from torch import nn

from neuron_serve.backends.neuron import sdk
from neuron_serve.backends.neuron.flags import neuronx_cc_flags
from neuron_serve.backends.neuron.quantization import (
    FP8_COMPILER_FLAG,
    nxd_q_config,
    nxdi_neuron_config,
    quantize_parallel_layers,
)
from neuron_serve.model.quantization import FP8_E4M3_MAX, QuantSpec, quantize_weight


class QuantizedDtype(enum.Enum):
    INT8 = torch.int8
    F8E4M3 = torch.float8_e4m3fn

    @classmethod
    def get_dtype(cls, dtype_string: str) -> torch.dtype:
        return cls[dtype_string.upper()].value


class QuantizationType(enum.Enum):
    PER_CHANNEL_SYMMETRIC = "per_channel_symmetric"


quantization_config = types.SimpleNamespace(
    QuantizedDtype=QuantizedDtype,
    get_default_per_channel_custom_qconfig_dict=lambda: {
        "quantization_type": QuantizationType.PER_CHANNEL_SYMMETRIC,
        "quantized_dtype": QuantizedDtype.INT8,
        "quantization_per_channel_axis": None,
        "activation_quantization_type": None,
        "clamp_bound": float("inf"),
    },
)
NEURON = {"target.kind": "neuron", "target.instance": "inf2.xlarge", "target.tp_degree": 2}


@pytest.mark.parametrize(
    ("method", "dtype", "name"), [("int8-weight", torch.int8, "int8"), ("fp8-weight", torch.float8_e4m3fn, "f8e4m3")]
)
def test_each_neuron_method_maps_to_nxd_and_nxd_inference_settings(method, dtype, name):
    spec = QuantSpec(method, skip=("embed_tokens", "lm_head"))
    q_config = nxd_q_config(spec, quantization_config)
    assert q_config["quantized_dtype"] == dtype
    assert q_config["quantization_type"] == QuantizationType.PER_CHANNEL_SYMMETRIC
    assert nxdi_neuron_config(spec) == {
        "quantized": True,
        "quantization_type": "per_channel_symmetric",
        "quantization_dtype": name,
        "modules_to_not_convert": ["embed_tokens", "lm_head"],
    }
    assert nxdi_neuron_config(QuantSpec()) == {}


def test_convert_gets_the_skipped_modules_and_fp8_gets_its_compiler_flag():
    calls = []

    def convert(model, **kwargs):
        calls.append(kwargs)
        return model

    model = nn.Linear(2, 2)
    spec = QuantSpec("int8-weight", skip=("lm_head", "down_proj"))
    assert quantize_parallel_layers(model, spec, convert, quantization_config) is model
    assert calls[0]["modules_to_not_convert"] == ["lm_head", "down_proj"] and calls[0]["inplace"]
    assert quantize_parallel_layers(model, QuantSpec(), convert, quantization_config) is model and len(calls) == 1
    assert FP8_COMPILER_FLAG in neuronx_cc_flags(tiny_recipe(**NEURON, **{"quantization.method": "fp8-weight"}))
    assert FP8_COMPILER_FLAG not in neuronx_cc_flags(tiny_recipe(**NEURON, **{"quantization.method": "int8-weight"}))


def test_fp8_weights_stay_inside_neurons_e4m3_range():
    weight = torch.randn(16, 64) * 3
    stored = quantize_weight(weight, QuantSpec("fp8-weight"))
    assert stored["weight"].dtype == torch.float8_e4m3fn and stored["scale"].shape == (16, 1)
    assert stored["weight"].float().abs().max() <= FP8_E4M3_MAX
    assert (
        (stored["weight"].float() * stored["scale"] - weight).abs() / weight.abs().amax(1, keepdim=True)
    ).max() < 0.07


@pytest.mark.neuron
@pytest.mark.skipif(not sdk.is_available(), reason="needs neuronx-distributed (the Neuron SDK), not installable here")
def test_the_real_nxd_config_maps_each_neuron_method():
    from neuronx_distributed.quantization import quantization_config as real_config

    assert nxd_q_config(QuantSpec("int8-weight"), real_config)["quantized_dtype"] == torch.int8
    assert nxd_q_config(QuantSpec("fp8-weight"), real_config)["quantized_dtype"] == torch.float8_e4m3fn
