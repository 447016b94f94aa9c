"""The SDK-backed Neuron backend: a clear error without the SDK; a real trace where it exists."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from neuron_serve.backends.neuron import sdk
from neuron_serve.recipe.files import load_recipe

LLAMA = Path(__file__).resolve().parent.parent / "compile" / "llama-3.1-8b-inf2.48xlarge.toml"


@pytest.mark.skipif(sdk.is_available(), reason="the Neuron SDK is installed here")
def test_without_sdk_the_error_names_the_pip_packages(tmp_path):
    assert sdk.missing_packages()
    with pytest.raises(sdk.NeuronUnavailable, match="torch-neuronx") as info:
        sdk.compile_graphs(load_recipe(LLAMA), torch.nn.Identity, {}, None, tmp_path / "o", tmp_path / "w")
    assert "pip.repos.neuron.amazonaws.com" in str(info.value)
    with pytest.raises(sdk.NeuronUnavailable):
        sdk.load_compiled(tmp_path / "o", tp_degree=1)


class TwoLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 16, bias=False)
        self.b = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.neuron
def test_trace_save_load_two_buckets_on_a_neuroncore(tmp_path):
    pytest.importorskip("torch_neuronx", reason="Neuron SDK (torch-neuronx) is not installed: needs an Inf2/Trn1 host")
    pytest.importorskip("neuronx_distributed", reason="Neuron SDK (neuronx-distributed) is not installed")
    torch.manual_seed(0)
    reference = TwoLinear()
    state = reference.state_dict()
    recipe = load_recipe(LLAMA)
    recipe.target = dataclasses.replace(recipe.target, tp_degree=1)
    recipe.compiler = dataclasses.replace(recipe.compiler, auto_cast="none")  # exact fp32 comparison
    inputs = {"bucket_4": (torch.randn(4, 16),), "bucket_8": (torch.randn(8, 16),)}
    sdk.compile_graphs(recipe, TwoLinear, inputs, lambda: state, tmp_path / "out", tmp_path / "work")
    model = sdk.load_compiled(tmp_path / "out", tp_degree=1)
    for (x,) in inputs.values():  # each shape routes to its own graph
        torch.testing.assert_close(model(x), reference(x))
