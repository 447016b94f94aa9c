"""Hugging Face `transformers` models built on the same weights as ours: the reference for logits."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from neuron_serve.model.config import ModelConfig

MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def hf_model(config: ModelConfig, state_dict: dict[str, torch.Tensor]):
    hf_config = AutoConfig.for_model(
        MODEL_TYPES[config.architecture],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.qkv_bias and config.architecture != "Qwen2ForCausalLM",
    )
    hf_config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    renamed = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m or (m == "lm_head.weight" and config.tie_word_embeddings) for m in missing), missing
    return model.eval()


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of a full forward pass over the sequence."""
    return model(torch.tensor([ids])).logits[0].float()
