"""The tensor-parallel split holds exactly the original weights."""

from __future__ import annotations

import pytest
import torch

from neuron_serve.model.sharding import kv_head_range, shard_state_dict
from neuron_serve.weights.loader import load_model_files
from neuron_serve.weights.tiny import write_tiny_model


def reassemble(config, shards: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    module = name.split(".")[-2]
    if module in ("q_proj", "gate_proj", "up_proj"):
        return torch.cat([s[name] for s in shards], dim=0)
    # Row-parallel: the weight's inputs, and a quantized weight's groups of them (one scale per output
    # channel, [out, 1], is every rank's whole).
    if module in ("o_proj", "down_proj") and not name.endswith("bias") and shards[0][name].shape[1] > 1:
        return torch.cat([s[name] for s in shards], dim=1)
    if module in ("k_proj", "v_proj"):
        heads = {}
        for rank, shard in enumerate(shards):
            first, last = kv_head_range(config, len(shards), rank)
            for offset, head in enumerate(range(first, last)):
                part = shard[name][offset * config.head_dim : (offset + 1) * config.head_dim]
                assert head not in heads or torch.equal(heads[head], part), "replicas of a KV head differ"
                heads[head] = part
        return torch.cat([heads[h] for h in sorted(heads)], dim=0)
    assert all(torch.equal(s[name], shards[0][name]) for s in shards if name in s)
    return shards[0][name]


@pytest.mark.parametrize(("kv_heads", "degree"), [(2, 2), (2, 4), (4, 2), (1, 4)])
def test_shards_together_hold_exactly_the_original_weights(tmp_path, kv_heads, degree):
    overrides = {"num_key_value_heads": kv_heads, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    loaded = load_model_files(str(write_tiny_model(tmp_path / "m", seed=1, **overrides)))
    shards = [shard_state_dict(loaded.config, loaded.state_dict, degree, rank) for rank in range(degree)]
    for name, tensor in loaded.state_dict.items():
        assert torch.equal(reassemble(loaded.config, shards, name), tensor), name
    q_rows = loaded.config.num_attention_heads * loaded.config.head_dim // degree
    assert shards[-1]["layers.0.self_attn.q_proj.weight"].shape[0] == q_rows
    assert shards[-1]["layers.0.self_attn.k_proj.bias"].shape[0] == max(1, kv_heads // degree) * loaded.config.head_dim
