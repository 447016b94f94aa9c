"""Load a Hugging Face model directory: config.json, *.safetensors and the tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from neuron_serve.model.config import ModelConfig
from neuron_serve.model.state import MissingWeightsError
from neuron_serve.weights.loaded import LoadedModel


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
