"""The CPU backend's C++ operators: decode attention against attention written out in torch ops, the
weight-only linear layers against matmuls of their dequantized weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from neuron_serve.backends.cpu.precision import cpu_flags
from neuron_serve.model import cpu_kernels
from neuron_serve.model.quantization import QuantSpec, dequantize, quantize_weight


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


def quantized_weights(method: str, shapes: list[tuple[int, int]]) -> tuple[list[dict], torch.Tensor]:
    """Each weight's stored tensors, and the float matrix [sum N, K] that they stand for together."""
    spec = QuantSpec(method, 32)
    stored = [quantize_weight(torch.randn(n, k) * 0.05, spec) for n, k in shapes]
    return stored, torch.cat([dequantize(s, spec) for s in stored])


def weight_only_linear(method: str, x: torch.Tensor, stored: list[dict]) -> torch.Tensor:
    weights, scales = [s["weight"] for s in stored], [s["scale"] for s in stored]
    if method == "int8-weight":
        return torch.ops.neuron_serve.int8_weight_linear(x, weights, scales)
    return torch.ops.neuron_serve.int4_weight_linear(x, weights, scales, [s["zero"] for s in stored], 32)


@pytest.mark.parametrize("method", ["int8-weight", "int4-weight"])
# 1 row: one tile; 7: 6 + 1; 40 and 70: with 256-bit tiles, widened once per call (int4 from 32, int8 from 64)
@pytest.mark.parametrize("rows", [1, 5, 7, 40, 70])
def test_weight_only_linear_computes_with_the_dequantized_weights(method, rows):
    cpu_kernels.load()
    torch.manual_seed(rows)
    stored, floats = quantized_weights(method, [(70, 96), (33, 96), (5, 96)])  # blocks of 32 rows and odd ends
    x = torch.randn(rows, 96)
    ours = weight_only_linear(method, x, stored)
    assert ours.shape == (rows, 108)
    assert (ours - x @ floats.T).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["int8-weight", "int4-weight"])
@pytest.mark.parametrize("rows", [3, 20])  # bf16 activations from 16 rows on: bf16 matmul of bf16 weights
def test_weight_only_linear_on_bf16_activations(method, rows):
    cpu_kernels.load()
    torch.manual_seed(rows)
    stored, floats = quantized_weights(method, [(64, 128), (40, 128)])
    x = torch.randn(rows, 128).bfloat16()
    first, again = weight_only_linear(method, x, stored), weight_only_linear(method, x, stored)
    assert first.dtype == torch.bfloat16 and torch.equal(first, again)
    expected = x.float() @ floats.T
    assert ((first.float() - expected).abs().max() / expected.abs().max()) < 2e-2


def test_int4_weight_linear_refuses_a_group_that_does_not_divide_the_inputs():
    cpu_kernels.load()
    stored, _ = quantized_weights("int4-weight", [(8, 64)])
    with pytest.raises(RuntimeError, match="group_size 48 must divide the 64 inputs"):
        torch.ops.neuron_serve.int4_weight_linear(
            torch.zeros(1, 64), [stored[0]["weight"]], [stored[0]["scale"]], [stored[0]["zero"]], 48
        )


def test_the_256_bit_tiles_where_the_cpu_has_avx512():
    """The weight-only checks above again, through the AVX2 tiles (NEURON_SERVE_CPU_ISA=avx2), in a
    process of their own: the kernels choose their tiles once per process."""
    if not {"avx512f", "avx512bw"} <= cpu_flags():
        pytest.skip("this CPU has no AVX-512: every test above runs the AVX2 tiles already")
    checks = ["-k", "weight_only_linear_computes or weight_only_linear_on_bf16"]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, *checks]
    result = subprocess.run(command, env={**os.environ, "NEURON_SERVE_CPU_ISA": "avx2"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "14 passed" in result.stdout
