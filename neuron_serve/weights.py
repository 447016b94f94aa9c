"""Load a model's weights, architecture and tokenizer from a Hugging Face directory or a GGUF file.

Both loaders produce the same thing, a `LoadedModel`: a `ModelConfig`, a state dict in this package's
parameter names (Hugging Face's, without the ``model.`` prefix) and a `transformers` tokenizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from neuron_serve.config import ModelConfig
from neuron_serve.model import LlamaModel
from neuron_serve.parallel import TensorParallel
from neuron_serve.rope import rope_tables
from neuron_serve.sources import resolve_source


class MissingWeightsError(ValueError):
    """The checkpoint lacks tensors that the architecture needs."""


@dataclass
class LoadedModel:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerBase
    source_path: Path


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_files(source: str, dtype: str = "float32") -> LoadedModel:
    """`source`: "default", "tiny", a HF directory, a .gguf file, or s3://bucket/prefix."""
    path = resolve_source(source)
    if path.suffix == ".gguf":
        from neuron_serve.gguf_loader import load_gguf

        loaded = load_gguf(path)
    else:
        loaded = load_hf_directory(path)
    loaded.state_dict = {k: v.to(DTYPES[dtype]) for k, v in loaded.state_dict.items()}
    check_complete(loaded.config, loaded.state_dict)
    return loaded


def load_hf_directory(path: Path) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: config.json is missing")
    config = ModelConfig.from_hf(json.loads(config_file.read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MissingWeightsError(f"{path} holds no *.safetensors files")
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(file).items():
            state_dict[re.sub(r"^model\.", "", name)] = tensor
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(config, state_dict, tokenizer, path)


def expected_parameters(config: ModelConfig) -> list[str]:
    with torch.device("meta"):  # allocates nothing
        model = LlamaModel(config, max_seq_len=1)
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    if config.tie_word_embeddings:
        names.remove("lm_head.weight")
    return names


def check_complete(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> None:
    missing = [name for name in expected_parameters(config) if name not in state_dict]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise MissingWeightsError(f"checkpoint is missing {len(missing)} tensor(s) for {config.architecture}: {shown}")


def build_model(loaded: LoadedModel, max_seq_len: int) -> LlamaModel:
    return model_from_state_dict(loaded.config, loaded.state_dict, max_seq_len)


def model_from_state_dict(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    max_seq_len: int,
    tp: TensorParallel | None = None,
    kernels: frozenset[str] = frozenset(),
) -> LlamaModel:
    """A model whose parameters are the given tensors themselves (no copy), using the fused
    `kernels` (names from nki_kernels.KERNELS)."""
    with torch.device("meta"):
        model = LlamaModel(config, max_seq_len, tp, kernels)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Buffers built on the meta device hold nothing: make the RoPE tables for real.
    model.rope_cos, model.rope_sin = rope_tables(config, max_seq_len)
    return model.eval()
