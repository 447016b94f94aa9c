"""rmsnorm_residual and qkv_rope: CPU implementations vs the references.

Tolerances: nki_kernels.testing (fp32 rtol 1e-4 / atol 1e-5; bf16 rtol 2e-2 / atol 1e-5, with why).
"""

from __future__ import annotations

import pytest
import torch

import nki_kernels
from nki_kernels import reference
from nki_kernels.testing import assert_close, qkv_inputs, randn

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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_qkv_rope_matches_reference(shape, dtype, with_bias):
    T, H, nh, nkv, hd = shape
    args = qkv_inputs(*shape, dtype, with_bias=with_bias, seed=T, rope_offset=5)
    got = nki_kernels.qkv_rope(*args)
    assert [t.shape for t in got] == [(T, nh, hd), (T, nkv, hd), (T, nkv, hd)]
    for a, b in zip(got, reference.qkv_rope(*args), strict=True):
        assert_close(a, b)
