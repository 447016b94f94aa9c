"""rmsnorm_residual, qkv_rope and qkv_rope_cache_write: CPU implementations vs the references.

Tolerances: nki_kernels.testing (fp32 rtol 1e-4 / atol 1e-5; bf16 rtol 2e-2 / atol 1e-5, with why).
"""

from __future__ import annotations

import pytest
import torch

import nki_kernels
from nki_kernels import reference
from nki_kernels.testing import assert_close, randn, rope_tables

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 8), (5, 576), (130, 64), (3, 4096)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rmsnorm_residual_matches_reference(T, H, dtype, with_residual):
    g = torch.Generator().manual_seed(T * H)
    x = randn(T, H, generator=g, dtype=dtype)
    residual = randn(T, H, generator=g, dtype=dtype) if with_residual else None
    weight = randn(H, generator=g, dtype=dtype)
    normed, new_residual = nki_kernels.rmsnorm_residual(x, residual, weight, 1e-6)
    ref_normed, ref_residual = reference.rmsnorm_residual(x, residual, weight, 1e-6)
    assert torch.equal(new_residual, ref_residual)
    assert_close(normed, ref_normed)


# (T, H, n_heads, n_kv_heads, hd): GQA ratios 1, 3 and 4; hidden sizes off the 128-row tile.
QKV_SHAPES = [(1, 64, 4, 4, 16), (7, 96, 9, 3, 32), (33, 200, 8, 2, 64), (130, 576, 9, 3, 64)]


def _qkv_inputs(T, H, nh, nkv, hd, dtype, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed + T)
    weights = [randn(n * hd, H, generator=g, dtype=dtype, scale=H**-0.5) for n in (nh, nkv, nkv)]
    biases = [randn(n * hd, generator=g, dtype=dtype) if with_bias else None for n in (nh, nkv, nkv)]
    cos, sin = rope_tables(T, hd, offset=5)
    return randn(T, H, generator=g, dtype=dtype), weights, biases, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_qkv_rope_matches_reference(shape, dtype, with_bias):
    T, H, nh, nkv, hd = shape
    x, (wq, wk, wv), (bq, bk, bv), cos, sin = _qkv_inputs(*shape, dtype, with_bias)
    got = nki_kernels.qkv_rope(x, wq, wk, wv, bq, bk, bv, cos, sin, nh, nkv)
    want = reference.qkv_rope(x, wq, wk, wv, bq, bk, bv, cos, sin, nh, nkv)
    assert [t.shape for t in got] == [(T, nh, hd), (T, nkv, hd), (T, nkv, hd)]
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV_SHAPES[:3])
def test_qkv_rope_cache_write_matches_reference(shape, dtype):
    T, H, nh, nkv, hd = shape
    x, (wq, wk, wv), (bq, bk, bv), cos, sin = _qkv_inputs(*shape, dtype, with_bias=True, seed=1)
    slots_total, max_len = T + 2, 40
    g = torch.Generator().manual_seed(2)
    slots = torch.randperm(slots_total, generator=g)[:T]  # one token per slot, as in decode
    positions = torch.randint(0, max_len, (T,), generator=g)  # slots of different lengths
    caches = [randn(slots_total, nkv, max_len, hd, generator=g, dtype=dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    q = nki_kernels.qkv_rope_cache_write(x, wq, wk, wv, bq, bk, bv, cos, sin, nh, nkv, *caches, slots, positions)
    ref_q = reference.qkv_rope_cache_write(x, wq, wk, wv, bq, bk, bv, cos, sin, nh, nkv, *ref_caches, slots, positions)
    assert_close(q, ref_q)
    written = torch.zeros(slots_total, max_len, dtype=torch.bool)
    written[slots, positions] = True
    for cache, ref_cache in zip(caches, ref_caches, strict=True):
        assert torch.equal(cache.permute(0, 2, 1, 3)[~written], ref_cache.permute(0, 2, 1, 3)[~written])
        assert_close(cache.permute(0, 2, 1, 3)[written], ref_cache.permute(0, 2, 1, 3)[written])


def test_qkv_rope_cache_write_prefill_chunk_into_one_slot():
    # Chunked prefill: T tokens of one request go to consecutive positions of the same slot.
    T, H, nh, nkv, hd = 6, 64, 4, 2, 16
    x, (wq, wk, wv), _, cos, sin = _qkv_inputs(T, H, nh, nkv, hd, torch.float32, with_bias=False)
    k_cache, v_cache = torch.zeros(3, nkv, 20, hd), torch.zeros(3, nkv, 20, hd)
    slots, positions = torch.full((T,), 1), torch.arange(10, 10 + T)
    nki_kernels.qkv_rope_cache_write(
        x, wq, wk, wv, None, None, None, cos, sin, nh, nkv, k_cache, v_cache, slots, positions
    )
    _, k, v = reference.qkv_rope(x, wq, wk, wv, None, None, None, cos, sin, nh, nkv)
    assert_close(k_cache[1, :, 10:16].transpose(0, 1), k)
    assert_close(v_cache[1, :, 10:16].transpose(0, 1), v)
    assert k_cache[[0, 2]].abs().sum() == 0 and k_cache[1, :, :10].abs().sum() == 0
