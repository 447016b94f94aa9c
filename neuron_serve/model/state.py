"""A model's tensors by name: which ones it needs, one rank's part as stored and as loaded, and a model
built on given tensors without copying them.

Names follow Hugging Face's ``LlamaForCausalLM`` without the ``model.`` prefix. A tied lm_head is
stored once (safetensors refuses two names for one tensor) and re-tied at load; the RoPE tables are
buffers that every graph takes as constants, so they are made at load, never stored.
"""

from __future__ import annotations

import torch

from neuron_serve.model.config import ModelConfig
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.parallel import TensorParallel
from neuron_serve.model.quantization import QuantSpec, quantize_modules
from neuron_serve.model.rope import rope_tables
from neuron_serve.model.sharding import shard_state_dict


class MissingWeightsError(ValueError):
    """The checkpoint lacks tensors that the architecture needs."""


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


def _lm_head_is_embeddings(config: ModelConfig, state: dict[str, torch.Tensor]) -> bool:
    """Whether a full state dict's lm_head is the embeddings (not when it was quantized, or differs)."""
    if not config.tie_word_embeddings or "lm_head.scale" in state:
        return False
    head = state.get("lm_head.weight")
    return head is None or torch.equal(head, state["embed_tokens.weight"])


def _stored_tied(config: ModelConfig, shard: dict[str, torch.Tensor]) -> bool:
    """Whether a stored shard left its lm_head out for the embeddings (`stored_shard`)."""
    return config.tie_word_embeddings and "lm_head.weight" not in shard


def stored_shard(
    config: ModelConfig, state_dict: dict[str, torch.Tensor], degree: int, rank: int
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors as an artifact stores them: contiguous, a tied lm_head left out."""
    shard = shard_state_dict(config, state_dict, degree, rank)
    if _lm_head_is_embeddings(config, shard):
        shard.pop("lm_head.weight", None)
    return {name: tensor.contiguous() for name, tensor in shard.items()}


def loadable_state(shard: dict[str, torch.Tensor], config: ModelConfig, max_seq_len: int) -> dict[str, torch.Tensor]:
    """A stored shard with what the model and its graphs also take: the tied lm_head, the RoPE tables."""
    state = dict(shard)
    if _stored_tied(config, shard):
        state["lm_head.weight"] = state["embed_tokens.weight"]
    state["rope_cos"], state["rope_sin"] = rope_tables(config, max_seq_len)
    return state


def model_from_state_dict(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    max_seq_len: int,
    tp: TensorParallel | None = None,
    kernels: frozenset[str] = frozenset(),
    quantization: QuantSpec | None = None,
) -> LlamaModel:
    """A model whose parameters are the given tensors themselves (no copy), using the fused
    `kernels` (names from nki_kernels.KERNELS), its linear layers those `quantization` stored."""
    with torch.device("meta"):
        model = LlamaModel(config, max_seq_len, tp, kernels)
        quantize_modules(model, quantization or QuantSpec())
    state = loadable_state(state_dict, config, max_seq_len)
    model.load_state_dict(state, strict=False, assign=True)
    if _stored_tied(config, state_dict):
        model.lm_head.weight = model.embed_tokens.weight
    # Non-persistent buffers are not loaded by load_state_dict: the meta ones hold nothing.
    model.rope_cos, model.rope_sin = state["rope_cos"], state["rope_sin"]
    return model.eval()
