"""One registry decides which implementation of a fused kernel a model calls, by device: the CPU
tiled versions on cpu, the NKI kernels launched with ``nki.jit`` on neuron (here: through the NKI
emulator, which stands in for the `nki` package)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import nxd_stand_in
import pytest
import torch
from test_neuron_integration import neuron_recipe, tiny_config

import nki_kernels.cpu
from neuron_serve.backends.neuron.compile import graph_factory
from neuron_serve.model.llama import LlamaModel
from nki_kernels import nki_emulator
from nki_kernels.registry import Kernels


def test_on_cpu_enabled_kernels_are_the_cpu_tiled_versions_and_the_rest_plain_ops():
    kernels = Kernels.enabled(frozenset({"rmsnorm_residual", "sampling"}), "cpu")
    assert kernels.rmsnorm_residual is nki_kernels.cpu.rmsnorm_residual
    assert kernels.swiglu_mlp is None, "not enabled: the plain ops run"
    model = LlamaModel(tiny_config()[0], 32, kernels=frozenset({"swiglu_mlp"}))
    assert model.layers[0].mlp.fused is nki_kernels.cpu.swiglu_mlp and model.norm.fused is None


def test_an_unknown_device_is_named():
    with pytest.raises(ValueError, match="unknown kernel device 'gpu'"):
        Kernels.enabled(frozenset({"rmsnorm_residual"}), "gpu")


def test_on_a_neuron_recipe_the_model_calls_the_nki_kernels_through_nki_jit(monkeypatch):
    nxd_stand_in.install(monkeypatch, 1)
    recipe = neuron_recipe()
    recipe.kernels.enabled = ["rmsnorm_residual", "swiglu_mlp"]
    with nki_emulator.installed():
        import nki

        module = graph_factory(recipe, tiny_config()[0])()
        layer = module.model.layers[0]
        for fused in (layer.input_layernorm.fused, layer.mlp.fused, module.model.norm.fused):
            assert fused.__func__.__module__ == "nki_kernels.nki.host" and fused.__self__.launch is nki.jit
        assert layer.self_attn.fused.qkv_rope is None


@contextlib.contextmanager
def neuron_and_plain_models(monkeypatch, kernels: list[str], max_seq_len: int, **hf) -> Iterator[tuple]:
    """The tiny model built for a neuron recipe with `kernels` and the plain one, on the same weights.
    The emulator's nki.jit only marks a kernel (as the real one does outside a traced model), so each
    launch runs in the emulator instead, as the NeuronCore would run it inside the graph."""
    nxd_stand_in.install(monkeypatch, 1)
    config, state = tiny_config(**hf)
    recipe = neuron_recipe()
    recipe.kernels.enabled, recipe.shapes.max_seq_len = kernels, max_seq_len
    plain = LlamaModel(config, max_seq_len)
    plain.load_state_dict(state, strict=False)
    with nki_emulator.installed():
        import nki

        import nki_kernels.nki.host  # noqa: F401  (the kernels, decorated with the emulator's own nki.jit)

        monkeypatch.setattr(nki, "jit", nki.simulate)
        model = graph_factory(recipe, config)().model
        model.load_state_dict(state, strict=False)
        with torch.inference_mode():
            yield model, plain


def test_the_nki_kernels_in_the_neuron_model_give_the_cpu_models_logits(monkeypatch):
    # the NKI MLP tiles the intermediate size by 128
    kernels = ["rmsnorm_residual", "swiglu_mlp"]
    with neuron_and_plain_models(monkeypatch, kernels, 128, intermediate_size=256) as (model, plain):
        tokens = torch.tensor([[5, 9, 200, 3, 17]])
        fused, _, _ = model.prefill(tokens, torch.tensor([4]))
        want, _, _ = plain.prefill(tokens, torch.tensor([4]))
    torch.testing.assert_close(fused, want, atol=1e-3, rtol=1e-3)


def test_the_nki_decode_attention_in_the_neuron_model_gives_the_cpu_models_decode_logits(monkeypatch):
    """The NKI decode kernel also returns the cached keys' log-sum-exp, by which the model merges each
    slot's own new key; a slot at position 0 has no cached keys and gets its own value alone. The
    kernel reads the cache in blocks of 512 keys."""
    with neuron_and_plain_models(monkeypatch, ["decode_attention"], 512) as (model, plain):
        config, g = model.config, torch.Generator().manual_seed(0)
        shape = (config.num_hidden_layers, 4, config.num_key_value_heads, 512, config.head_dim)
        k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        tokens, positions = torch.tensor([5, 9, 200, 17]), torch.tensor([0, 1, 300, 511])
        fused, _, _ = model.decode(tokens, positions, k_cache, v_cache, 512)
        want, _, _ = plain.decode(tokens, positions, k_cache, v_cache, 512)
    torch.testing.assert_close(fused, want, atol=1e-3, rtol=1e-3)
