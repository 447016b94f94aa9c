"""The NKI kernels in NKI's CPU simulator (nki.simulate), against the references.

Needs the real `nki` package (>= 0.3, from AWS's Neuron package repository; PyPI's is a placeholder):
every test here is marked `neuron` and skips, with the reason, where it is not importable. Run with
`pytest -m neuron tests/test_kernels_nki_sim.py`. The target is Inferentia2 (NeuronCore-v2).

Tolerances: nki_kernels.testing.SIMULATOR_TOLERANCE (fp32 rtol 5e-3 / atol 1e-3 for the Scalar
Engine's polynomial activations; bf16 rtol 2e-2 / atol 2e-2 for the kernels' bf16 Tensor Engine
operands), with the reasoning there.
"""

from __future__ import annotations

import os

import pytest
import torch

from nki_kernels import reference
from nki_kernels.availability import nki_unavailable_reason
from nki_kernels.testing import SIMULATOR_TOLERANCE, assert_close, randn, rope_tables

pytestmark = [
    pytest.mark.neuron,
    pytest.mark.skipif(nki_unavailable_reason() is not None, reason=f"NKI simulator: {nki_unavailable_reason()}"),
]

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def host():
    os.environ.setdefault("NEURON_PLATFORM_TARGET_OVERRIDE", "inf2")
    from nki_kernels.nki import host

    return host


def _close(actual, expected):
    assert_close(actual, expected, SIMULATOR_TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 576), (130, 256)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rmsnorm_residual_simulated(host, T, H, dtype, with_residual):
    g = torch.Generator().manual_seed(0)
    x, weight = randn(T, H, generator=g, dtype=dtype), randn(H, generator=g, dtype=dtype)
    residual = randn(T, H, generator=g, dtype=dtype) if with_residual else None
    normed, new_residual = host.rmsnorm_residual(x, residual, weight, 1e-6)
    ref_normed, ref_residual = reference.rmsnorm_residual(x, residual, weight, 1e-6)
    _close(normed, ref_normed)
    _close(new_residual, ref_residual)


def _qkv_inputs(T, H, nh, nkv, hd, dtype):
    g = torch.Generator().manual_seed(T)
    ws = [randn(n * hd, H, generator=g, dtype=dtype, scale=H**-0.5) for n in (nh, nkv, nkv)]
    bs = [randn(n * hd, generator=g, dtype=dtype) for n in (nh, nkv, nkv)]
    cos, sin = rope_tables(T, hd)
    return randn(T, H, generator=g, dtype=dtype), ws, bs, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 576, 9, 3, 64), (130, 256, 8, 2, 128)])
def test_qkv_rope_simulated(host, shape, dtype):
    x, (wq, wk, wv), (bq, bk, bv), cos, sin = _qkv_inputs(*shape, dtype)
    T, _, nh, nkv, _ = shape
    got = host.qkv_rope(x, wq, wk, wv, bq, bk, bv, cos, sin, nh, nkv)
    for a, b in zip(got, reference.qkv_rope(x, wq, wk, wv, bq, bk, bv, cos, sin, nh, nkv), strict=True):
        _close(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_cache_write_simulated(host, dtype):
    T, H, nh, nkv, hd = 4, 576, 9, 3, 64
    x, (wq, wk, wv), (bq, bk, bv), cos, sin = _qkv_inputs(T, H, nh, nkv, hd, dtype)
    slots, positions = torch.tensor([3, 0, 2, 5]), torch.tensor([7, 0, 31, 12])
    caches = [torch.zeros(6, nkv, 32, hd, dtype=dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    q = host.qkv_rope_cache_write(x, wq, wk, wv, bq, bk, bv, cos, sin, nh, nkv, *caches, slots, positions)
    ref_q = reference.qkv_rope_cache_write(x, wq, wk, wv, bq, bk, bv, cos, sin, nh, nkv, *ref_caches, slots, positions)
    _close(q, ref_q)
    for cache, ref_cache in zip(caches, ref_caches, strict=True):
        _close(cache, ref_cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,H,G,L,D", [(3, 9, 3, 512, 64), (2, 8, 2, 1024, 128), (2, 4, 4, 512, 64)])
def test_decode_attention_simulated(host, S, H, G, L, D, dtype):
    g = torch.Generator().manual_seed(L)
    q = randn(S, H, D, generator=g, dtype=dtype)
    k_cache, v_cache = randn(S, G, L, D, generator=g, dtype=dtype), randn(S, G, L, D, generator=g, dtype=dtype)
    lengths = torch.tensor([L, 1, 300][:S])
    _close(
        host.decode_attention(q, k_cache, v_cache, lengths, D**-0.5),
        reference.decode_attention(q, k_cache, v_cache, lengths, D**-0.5),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,G,T,offset,D", [(9, 3, 128, 0, 64), (8, 2, 256, 256, 128), (4, 4, 128, 384, 64)])
def test_prefill_attention_simulated(host, H, G, T, offset, D, dtype):
    g = torch.Generator().manual_seed(T + offset)
    Lk = -(-(offset + T) // 512) * 512  # keys padded to the kernel's 512-key block; never visible
    q = randn(H, T, D, generator=g, dtype=dtype)
    k, v = randn(G, Lk, D, generator=g, dtype=dtype), randn(G, Lk, D, generator=g, dtype=dtype)
    _close(host.prefill_attention(q, k, v, offset, D**-0.5), reference.prefill_attention(q, k, v, offset, D**-0.5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,I", [(4, 576, 1536), (130, 256, 512)])
def test_swiglu_mlp_simulated(host, T, H, I, dtype):  # noqa: E741
    g = torch.Generator().manual_seed(T)
    x = randn(T, H, generator=g, dtype=dtype)
    w_gate, w_up = (randn(I, H, generator=g, dtype=dtype, scale=H**-0.5) for _ in range(2))
    w_down = randn(H, I, generator=g, dtype=dtype, scale=I**-0.5)
    _close(host.swiglu_mlp(x, w_gate, w_up, w_down), reference.swiglu_mlp(x, w_gate, w_up, w_down))


def test_sample_simulated(host):
    S, V = 16, 4096
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(S, V, generator=g) * 3
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3] * 4)
    top_k = torch.tensor([0, 0, 40, 0] * 4)
    top_p = torch.tensor([1.0, 0.9, 1.0, 1.0] * 4)
    uniform = torch.rand(S, generator=g)
    got = host.sample(logits, temperature, top_k, top_p, uniform, tile=1024, max_candidates=64)
    want = reference.sample(logits, temperature, top_k, top_p, uniform, max_candidates=64)
    greedy = temperature == 0
    assert torch.equal(got[greedy], want[greedy])
    # The kernel multiplies by 1/T and sums in fp32, so a draw right at a CDF step may land one
    # token over; most rows must agree exactly.
    assert (got == want).float().mean() >= 0.9
