"""Load a model's weights, architecture and tokenizer from any source a recipe may name."""

from __future__ import annotations

import torch

from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.quantization import QuantSpec, quantize_state_dict
from neuron_serve.model.state import check_complete, model_from_state_dict
from neuron_serve.weights.gguf_file import load_gguf
from neuron_serve.weights.hf import load_hf_directory
from neuron_serve.weights.loaded import LoadedModel
from neuron_serve.weights.sources import resolve_source


def load_model_files(source: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """`source`: "default", "tiny", a HF directory, a .gguf file, or s3://bucket/prefix."""
    path = resolve_source(source)
    loaded = load_gguf(path) if path.suffix == ".gguf" else load_hf_directory(path)
    loaded.state_dict = {k: v.to(dtype) for k, v in loaded.state_dict.items()}
    check_complete(loaded.config, loaded.state_dict)
    return loaded


def build_model(loaded: LoadedModel, max_seq_len: int, quantization: QuantSpec | None = None) -> LlamaModel:
    """The eager model, its weights quantized as `quantization` says (the source's own codes where kept)."""
    spec = quantization or QuantSpec()
    state = quantize_state_dict(loaded.state_dict, spec, loaded.kept_quantization(spec))
    return model_from_state_dict(loaded.config, state, max_seq_len, quantization=spec)
