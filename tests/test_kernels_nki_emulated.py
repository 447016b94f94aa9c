"""The NKI kernels run through nki_kernels.nki_emulator, our numpy model of the NKI 0.3 instructions
they use, against the references. This runs everywhere (no Neuron SDK): it checks each kernel's
algorithm, indexing and NeuronCore-v2 tile limits, not whether the NKI compiler accepts it (that is
test_kernels_nki_sim.py, with AWS's simulator).

Tolerances: fp32 as the CPU kernels (nki_kernels.testing.CPU_TOLERANCE: the emulator computes in
fp32 like the engines, only the order of sums differs); bf16 as the simulator
(SIMULATOR_TOLERANCE: the kernels round softmax probabilities and silu(g) * u to bf16 for the
Tensor Engine, where the references keep fp32).
"""

from __future__ import annotations

import pytest
import torch

from nki_kernels import nki_emulator, reference
from nki_kernels.testing import CPU_TOLERANCE, SIMULATOR_TOLERANCE, assert_close, randn, rope_tables

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def host():
    with nki_emulator.installed():
        from nki_kernels.nki import host

        yield host


def _close(actual, expected):
    tolerance = CPU_TOLERANCE if expected.dtype == torch.float32 else SIMULATOR_TOLERANCE
    assert_close(actual, expected, tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,with_residual", [(1, 576, True), (130, 200, True), (3, 64, False)])
def test_rmsnorm_residual_emulated(host, T, H, with_residual, dtype):
    g = torch.Generator().manual_seed(T)
    x, weight = randn(T, H, generator=g, dtype=dtype), randn(H, generator=g, dtype=dtype)
    residual = randn(T, H, generator=g, dtype=dtype) if with_residual else None
    got = host.rmsnorm_residual(x, residual, weight, 1e-6)
    want = reference.rmsnorm_residual(x, residual, weight, 1e-6)
    _close(got[0], want[0])
    assert torch.equal(got[1], want[1])


def _qkv_inputs(T, H, nh, nkv, hd, dtype, with_bias):
    g = torch.Generator().manual_seed(T + H)
    ws = [randn(n * hd, H, generator=g, dtype=dtype, scale=H**-0.5) for n in (nh, nkv, nkv)]
    bs = [randn(n * hd, generator=g, dtype=dtype) if with_bias else None for n in (nh, nkv, nkv)]
    cos, sin = rope_tables(T, hd, offset=3)
    return randn(T, H, generator=g, dtype=dtype), ws, bs, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,with_bias", [((5, 576, 9, 3, 64), True), ((130, 200, 8, 2, 128), False)])
def test_qkv_rope_emulated(host, shape, with_bias, dtype):
    x, (wq, wk, wv), (bq, bk, bv), cos, sin = _qkv_inputs(*shape, dtype, with_bias)
    nh, nkv = shape[2], shape[3]
    got = host.qkv_rope(x, wq, wk, wv, bq, bk, bv, cos, sin, nh, nkv)
    for a, b in zip(got, reference.qkv_rope(x, wq, wk, wv, bq, bk, bv, cos, sin, nh, nkv), strict=True):
        _close(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_cache_write_emulated(host, dtype):
    T, H, nh, nkv, hd = 5, 200, 8, 2, 64
    x, (wq, wk, wv), (bq, bk, bv), cos, sin = _qkv_inputs(T, H, nh, nkv, hd, dtype, with_bias=True)
    slots, positions = torch.tensor([3, 0, 2, 5, 1]), torch.tensor([7, 0, 15, 12, 3])
    g = torch.Generator().manual_seed(1)
    caches = [randn(6, nkv, 16, hd, generator=g, dtype=dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    q = host.qkv_rope_cache_write(x, wq, wk, wv, bq, bk, bv, cos, sin, nh, nkv, *caches, slots, positions)
    ref_q = reference.qkv_rope_cache_write(x, wq, wk, wv, bq, bk, bv, cos, sin, nh, nkv, *ref_caches, slots, positions)
    _close(q, ref_q)
    for cache, ref_cache in zip(caches, ref_caches, strict=True):
        _close(cache, ref_cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S,H,G,L,D,lengths", [(3, 9, 3, 1024, 64, [1024, 0, 513]), (2, 4, 4, 512, 128, [1, 511])])
def test_decode_attention_emulated(host, S, H, G, L, D, lengths, dtype):
    g = torch.Generator().manual_seed(L)
    q = randn(S, H, D, generator=g, dtype=dtype)
    k_cache, v_cache = randn(S, G, L, D, generator=g, dtype=dtype), randn(S, G, L, D, generator=g, dtype=dtype)
    lengths = torch.tensor(lengths)
    _close(
        host.decode_attention(q, k_cache, v_cache, lengths, D**-0.5),
        reference.decode_attention(q, k_cache, v_cache, lengths, D**-0.5),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,G,T,offset,D", [(9, 3, 128, 0, 64), (4, 2, 256, 256, 64), (2, 2, 128, 300, 128)])
def test_prefill_attention_emulated(host, H, G, T, offset, D, dtype):
    g = torch.Generator().manual_seed(T + offset)
    Lk = -(-(offset + T) // 512) * 512  # keys padded to the 512-key block; the padding is never visible
    q = randn(H, T, D, generator=g, dtype=dtype)
    k, v = randn(G, Lk, D, generator=g, dtype=dtype), randn(G, Lk, D, generator=g, dtype=dtype)
    _close(host.prefill_attention(q, k, v, offset, D**-0.5), reference.prefill_attention(q, k, v, offset, D**-0.5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,I", [(5, 576, 1536), (130, 200, 256)])
def test_swiglu_mlp_emulated(host, T, H, I, dtype):  # noqa: E741
    g = torch.Generator().manual_seed(T)
    x = randn(T, H, generator=g, dtype=dtype)
    w_gate = randn(I, H, generator=g, dtype=dtype, scale=H**-0.5)
    w_up = randn(I, H, generator=g, dtype=dtype, scale=H**-0.5)
    w_down = randn(H, I, generator=g, dtype=dtype, scale=I**-0.5)
    _close(host.swiglu_mlp(x, w_gate, w_up, w_down), reference.swiglu_mlp(x, w_gate, w_up, w_down))


def test_sample_emulated(host):
    S, V = 20, 1000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(S, V, generator=g) * 3
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.5] * 4)
    top_k = torch.tensor([0, 0, 40, 0, 5] * 4)
    top_p = torch.tensor([1.0, 0.9, 1.0, 1.0, 0.5] * 4)
    uniform = torch.rand(S, generator=g)
    got = host.sample(logits, temperature, top_k, top_p, uniform, tile=256, max_candidates=64)
    want = reference.sample(logits, temperature, top_k, top_p, uniform, max_candidates=64)
    # 1/T multiplies instead of dividing and the running sums are fp32: a draw within ~1e-7 of a CDF
    # step may differ, which these seeds do not hit.
    assert torch.equal(got, want)


def test_emulator_enforces_the_rules():
    with nki_emulator.installed():
        import nki.isa as nisa
        import nki.language as nl

        tile = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.sbuf)
        with pytest.raises(nki_emulator.EmulatorError, match="nested"):
            tile[0:64, 0:256][0:32, 0:8]
        with pytest.raises(nki_emulator.EmulatorError, match="partitions"):
            nl.ndarray((129, 4), dtype=nl.float32, buffer=nl.sbuf)
        bank = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
        with pytest.raises(nki_emulator.EmulatorError, match="moving free"):
            nisa.nc_matmul(dst=bank, stationary=tile[0:128, 0:128], moving=nl.ndarray((128, 600), nl.float32))
        with pytest.raises(nki_emulator.EmulatorError, match="PSUM"):
            nisa.dma_copy(dst=tile, src=bank)
        with pytest.raises(nki_emulator.EmulatorError, match="vector"):
            nisa.activation(dst=tile, op=nl.exp, data=tile, bias=0.5)
