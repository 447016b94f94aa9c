"""The CPU backend's C++ decode attention operator against attention written out in torch ops."""

from __future__ import annotations

import pytest
import torch

from neuron_serve.model import cpu_kernels


def attention_written_out(q, k, v, k_cache, v_cache, layer, positions, scale):
    """Each (slot, KV head): its query heads over the cached keys 0..p-1 and the step's own key."""
    slots, heads, _ = q.shape
    group = heads // k.shape[1]
    out = torch.empty(q.shape)
    for s in range(slots):
        p = int(positions[s])
        for g in range(k.shape[1]):
            keys = torch.cat([k_cache[layer, s, g, :p], k[s, g : g + 1]]).float()
            values = torch.cat([v_cache[layer, s, g, :p], v[s, g : g + 1]]).float()
            rows = slice(g * group, (g + 1) * group)
            out[s, rows] = torch.softmax(q[s, rows].float() @ keys.T * scale, dim=-1) @ values
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 8), (6, 2, 12)]
)  # head_dim 12: the path without AVX2 vectors
def test_decode_attention_matches_attention_written_out(dtype, heads, kv_heads, head_dim):
    cpu_kernels.load()
    torch.manual_seed(0)
    slots, max_len = 4, 150  # positions past 64: the keys go through in several chunks
    q = torch.randn(slots, heads, head_dim, dtype=dtype)
    k, v = (torch.randn(slots, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(2, slots + 1, kv_heads, max_len, head_dim, dtype=dtype) for _ in range(2))
    positions = torch.tensor([0, max_len - 1, 17, 70])  # 0: only the step's own key
    args = (q, k, v, k_cache, v_cache, 1, positions, head_dim**-0.5)
    ours = torch.ops.neuron_serve.decode_attention(*args)
    assert ours.dtype == dtype and ours.shape == q.shape
    expected = attention_written_out(*args)
    assert (ours.float() - expected).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)
    assert (ours[0].float() - v[0].float().repeat_interleave(heads // kv_heads, dim=0)).abs().max() < 1e-6


def test_a_position_outside_the_cache_is_refused_by_name():
    cpu_kernels.load()
    q, k = torch.zeros(1, 2, 8), torch.zeros(1, 1, 8)
    cache = torch.zeros(1, 1, 1, 16, 8)
    with pytest.raises(RuntimeError, match="position 16 of row 0 is outside the cache's 16"):
        torch.ops.neuron_serve.decode_attention(q, k, k, cache, cache, 0, torch.tensor([16]), 1.0)
