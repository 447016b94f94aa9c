"""The NKI kernels against the references, each case run in two modes (nki_kernels.testing.nki_run):

- emulated: through nki_kernels.nki_emulator, our numpy model of the NKI 0.3 instructions they use.
  This runs everywhere (no Neuron SDK): it checks each kernel's algorithm, indexing and
  NeuronCore-v2 tile limits, not whether the NKI compiler accepts it.
- simulated: in AWS's NKI CPU simulator (nki.simulate), targeting Inferentia2 (NeuronCore-v2). It
  needs the real `nki` package (>= 0.3, from AWS's Neuron package repository; PyPI's is a
  placeholder): these cases are marked `neuron` and skip, with the reason, where it is not
  importable. Run them with `pytest -m neuron tests/test_kernels_nki.py`.

Tolerances: nki_kernels.testing.NKI_TOLERANCE per mode, with the reasoning there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from nki_kernels import nki_emulator, reference
from nki_kernels.availability import nki_unavailable_reason
from nki_kernels.testing import NkiRun, decode_inputs, mlp_inputs, nki_run, prefill_inputs, qkv_inputs, randn

DTYPES = [torch.float32, torch.bfloat16]
SIMULATED = pytest.param(
    "simulated",
    marks=[
        pytest.mark.neuron,
        pytest.mark.skipif(nki_unavailable_reason() is not None, reason=f"NKI simulator: {nki_unavailable_reason()}"),
    ],
)


@pytest.fixture(scope="module", params=["emulated", SIMULATED])
def nki(request) -> Iterator[NkiRun]:
    with nki_run(request.param) as run:
        yield run


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "T,H,with_residual",
    [(1, 576, True), (1, 576, False), (130, 200, True), (130, 256, True), (130, 256, False), (3, 64, False)],
)
def test_rmsnorm_residual(nki, T, H, with_residual, dtype):
    g = torch.Generator().manual_seed(T)
    x, weight = randn(T, H, generator=g, dtype=dtype), randn(H, generator=g, dtype=dtype)
    residual = randn(T, H, generator=g, dtype=dtype) if with_residual else None
    normed, new_residual = nki.host.rmsnorm_residual(x, residual, weight, 1e-6)
    ref_normed, ref_residual = reference.rmsnorm_residual(x, residual, weight, 1e-6)
    nki.assert_close(normed, ref_normed)
    if nki.mode == "emulated":  # the emulator rounds the add to bf16 as torch does: bit for bit
        assert torch.equal(new_residual, ref_residual)
    else:
        nki.assert_close(new_residual, ref_residual)


# ((T, H, n_heads, n_kv_heads, hd), with_bias): GQA 3 and 4, H on and off the 128-row chunk, T over one tile.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,with_bias",
    [
        ((5, 576, 9, 3, 64), True),
        ((4, 576, 9, 3, 64), True),
        ((130, 200, 8, 2, 128), False),
        ((130, 256, 8, 2, 128), True),
    ],
)
def test_qkv_rope(nki, shape, with_bias, dtype):
    T, H = shape[:2]
    args = qkv_inputs(*shape, dtype, with_bias=with_bias, seed=T + H, rope_offset=3)
    for got, want in zip(nki.host.qkv_rope(*args), reference.qkv_rope(*args), strict=True):
        nki.assert_close(got, want)


# (S, n_heads, n_kv, L, hd, lengths): a slot of length 0 or 1, lengths either side of the 512-key block.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "S,H,G,L,D,lengths",
    [
        (3, 9, 3, 1024, 64, [1024, 0, 513]),
        (3, 9, 3, 512, 64, [512, 1, 300]),
        (2, 8, 2, 1024, 128, [1024, 1]),
        (2, 4, 4, 512, 128, [1, 511]),
        (2, 4, 4, 512, 64, [512, 1]),
    ],
)
def test_decode_attention(nki, S, H, G, L, D, lengths, dtype):
    q, k_cache, v_cache, lengths = decode_inputs(S, H, G, L, D, dtype, seed=L, lengths=lengths)
    nki.assert_close(
        nki.host.decode_attention(q, k_cache, v_cache, lengths, D**-0.5),
        reference.decode_attention(q, k_cache, v_cache, lengths, D**-0.5),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "H,G,T,offset,D",
    [(9, 3, 128, 0, 64), (4, 2, 256, 256, 64), (8, 2, 256, 256, 128), (2, 2, 128, 300, 128), (4, 4, 128, 384, 64)],
)
def test_prefill_attention(nki, H, G, T, offset, D, dtype):
    Lk = -(-(offset + T) // 512) * 512  # keys padded to the kernel's 512-key block; the padding is never visible
    q, k, v = prefill_inputs(H, G, T, Lk, D, dtype, seed=T + offset)
    nki.assert_close(
        nki.host.prefill_attention(q, k, v, offset, D**-0.5), reference.prefill_attention(q, k, v, offset, D**-0.5)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,I", [(5, 576, 1536), (4, 576, 1536), (130, 200, 256), (130, 256, 512)])
def test_swiglu_mlp(nki, T, H, I, dtype):  # noqa: E741
    args = mlp_inputs(T, H, I, dtype, seed=T)
    nki.assert_close(nki.host.swiglu_mlp(*args), reference.swiglu_mlp(*args))


# (temperature, top_k, top_p) of the rows, in turn: greedy, top-p, top-k, neither filter, both.
ROW_SETTINGS = [(0.0, 0, 1.0), (0.7, 0, 0.9), (1.0, 40, 1.0), (1.3, 0, 1.0), (0.5, 5, 0.5)]


@pytest.mark.parametrize("S,V,tile", [(20, 1000, 256), (16, 4096, 1024)])
def test_sample(nki, S, V, tile):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(S, V, generator=g) * 3
    rows = [ROW_SETTINGS[i % len(ROW_SETTINGS)] for i in range(S)]
    temperature, top_k, top_p = (torch.tensor(column) for column in zip(*rows, strict=True))
    uniform = torch.rand(S, generator=g)
    got = nki.host.sample(logits, temperature, top_k, top_p, uniform, tile=tile, max_candidates=64)
    want = reference.sample(logits, temperature, top_k, top_p, uniform, max_candidates=64)
    if nki.mode == "emulated":
        # 1/T multiplies instead of dividing and the running sums are fp32: a draw within ~1e-7 of a
        # CDF step may differ, which these seeds do not hit.
        assert torch.equal(got, want)
    else:
        greedy = temperature == 0
        assert torch.equal(got[greedy], want[greedy])
        # The kernel multiplies by 1/T and sums in fp32, so a draw right at a CDF step may land one
        # token over; most rows must agree exactly.
        assert (got == want).float().mean() >= 0.9


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
