"""What every weight loader returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from neuron_serve.model.config import ModelConfig


@dataclass
class LoadedModel:
    """A `ModelConfig`, a state dict in this package's parameter names (Hugging Face's, without the
    ``model.`` prefix) and a `transformers` tokenizer."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerBase
    source_path: Path
