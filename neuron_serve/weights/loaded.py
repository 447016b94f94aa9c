"""What every weight loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from neuron_serve.model.config import ModelConfig
from neuron_serve.model.quantization import QuantSpec

INT4_CODES_GROUP = 32  # GGUF's Q4_0/Q4_1 blocks


@dataclass
class LoadedModel:
    """A `ModelConfig`, a state dict in this package's parameter names (Hugging Face's, without the
    ``model.`` prefix) and a `transformers` tokenizer."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerBase
    source_path: Path
    # A quantized source's own int4 codes by layer, in int4-weight's stored layout with group size 32
    # (model/quantization.py): GGUF Q4_0/Q4_1 tensors (weights/gguf_file.py).
    int4_codes: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def kept_quantization(self, spec: QuantSpec) -> dict[str, dict[str, torch.Tensor]]:
        """The layers whose stored tensors under `spec` are the source's own (`quantize_state_dict`'s `kept`)."""
        return self.int4_codes if spec.method == "int4-weight" and spec.group_size == INT4_CODES_GROUP else {}
