"""decode_attention and prefill_attention: CPU blockwise implementations vs the references,
masking properties (hypothesis), and torch.export of both.

Tolerances: nki_kernels.testing (fp32 rtol 1e-4 / atol 1e-5; bf16 rtol 2e-2 / atol 1e-5, with why).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nki_kernels
from nki_kernels import reference
from nki_kernels.testing import assert_close, decode_inputs, prefill_inputs

DTYPES = [torch.float32, torch.bfloat16]


# (S, n_heads, n_kv, L, hd, block): GQA 1, 3 and 4; L a multiple of the block or not; L < block.
DECODE_CASES = [
    (1, 4, 4, 64, 16, 16),
    (3, 9, 3, 100, 32, 32),
    (4, 8, 2, 300, 64, 128),
    (2, 6, 2, 40, 8, 512),
    (5, 12, 3, 1024, 64, 512),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_attention_matches_reference(case, dtype):
    S, H, G, L, D, block = case
    q, k_cache, v_cache, lengths = decode_inputs(S, H, G, L, D, dtype, seed=L)
    lengths[0] = L  # always one full slot; the others random, 0 included
    got = nki_kernels.decode_attention(q, k_cache, v_cache, lengths, D**-0.5, block_size=block)
    assert_close(got, reference.decode_attention(q, k_cache, v_cache, lengths, D**-0.5))


def test_decode_attention_edge_lengths_and_empty_slot():
    q, k_cache, v_cache, _ = decode_inputs(5, 4, 2, 96, 16, torch.float32, seed=1)
    lengths = torch.tensor([0, 1, 31, 32, 96])  # empty, one key, either side of a block edge, full
    got = nki_kernels.decode_attention(q, k_cache, v_cache, lengths, 0.25, block_size=32)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert_close(got, reference.decode_attention(q, k_cache, v_cache, lengths, 0.25))


# (n_heads, n_kv, T, q_offset, extra keys, hd, block_q, block_k): GQA 1, 3, 4; ragged blocks;
# chunked prefill (q_offset > 0); keys beyond the last query's horizon (extra > 0).
PREFILL_CASES = [
    (4, 4, 16, 0, 0, 16, 8, 8),
    (9, 3, 37, 0, 0, 32, 16, 24),
    (8, 2, 50, 13, 0, 64, 16, 32),
    (6, 2, 20, 100, 7, 8, 128, 512),
    (3, 3, 130, 5, 3, 16, 128, 512),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize("offset_as_tensor", [False, True])
def test_prefill_attention_matches_reference(case, dtype, offset_as_tensor):
    H, G, T, offset, extra, D, bq, bk = case
    q, k, v = prefill_inputs(H, G, T, offset + T + extra, D, dtype, seed=T)
    q_offset = torch.tensor(offset) if offset_as_tensor else offset
    got = nki_kernels.prefill_attention(q, k, v, q_offset, D**-0.5, block_q=bq, block_k=bk)
    assert_close(got, reference.prefill_attention(q, k, v, offset, D**-0.5))


@settings(max_examples=30, deadline=None)
@given(
    S=st.integers(1, 4),
    rep=st.sampled_from([1, 3, 4]),
    G=st.integers(1, 2),
    L=st.integers(1, 80),
    block=st.sampled_from([8, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_decode_keys_beyond_length_never_matter(S, rep, G, L, block, seed):
    q, k_cache, v_cache, lengths = decode_inputs(S, rep * G, G, L, 8, torch.float32, seed)
    before = nki_kernels.decode_attention(q, k_cache, v_cache, lengths, 0.5, block_size=block)
    beyond = torch.arange(L)[None, :] >= lengths[:, None]  # [S, L]
    mask = beyond[:, None, :, None]
    noise = torch.randn(k_cache.shape, generator=torch.Generator().manual_seed(seed + 1)) * 100
    after = nki_kernels.decode_attention(
        q, torch.where(mask, noise, k_cache), torch.where(mask, -noise, v_cache), lengths, 0.5, block_size=block
    )
    assert torch.equal(before, after)


@settings(max_examples=30, deadline=None)
@given(
    rep=st.sampled_from([1, 3, 4]),
    T=st.integers(1, 40),
    offset=st.integers(0, 30),
    extra=st.integers(0, 5),
    blocks=st.sampled_from([(8, 8), (16, 32), (128, 512)]),
    key=st.integers(0, 10**6),
    seed=st.integers(0, 2**16),
)
def test_prefill_keys_beyond_causal_limit_never_matter(rep, T, offset, extra, blocks, key, seed):
    Lk = offset + T + extra
    j = key % Lk  # perturb key/value j: queries i with j > offset + i must not change
    q, k, v = prefill_inputs(rep * 2, 2, T, Lk, 8, torch.float32, seed)
    bq, bk = blocks
    before = nki_kernels.prefill_attention(q, k, v, torch.tensor(offset), 0.5, block_q=bq, block_k=bk)
    k2, v2 = k.clone(), v.clone()
    k2[:, j] += 50.0
    v2[:, j] -= 50.0
    after = nki_kernels.prefill_attention(q, k2, v2, torch.tensor(offset), 0.5, block_q=bq, block_k=bk)
    blind = torch.arange(T) < j - offset  # queries that cannot see key j
    assert torch.equal(before[:, blind], after[:, blind])


class DecodeModule(torch.nn.Module):
    def forward(self, q, k_cache, v_cache, lengths):
        return nki_kernels.decode_attention(q, k_cache, v_cache, lengths, 0.125, block_size=32)


class PrefillModule(torch.nn.Module):
    def forward(self, q, k, v, q_offset):
        return nki_kernels.prefill_attention(q, k, v, q_offset, 0.125, block_q=16, block_k=32)


def test_decode_attention_exports_and_matches_eager():
    q, k_cache, v_cache, lengths = decode_inputs(3, 6, 2, 80, 16, torch.float32, seed=3, lengths=[80, 5, 0])
    exported = torch.export.export(DecodeModule(), (q, k_cache, v_cache, lengths))
    other_lengths = torch.tensor([1, 33, 64])  # values unlike the traced ones: nothing was baked in
    for lens in (lengths, other_lengths):
        got = exported.module()(q, k_cache, v_cache, lens)
        assert torch.equal(got, DecodeModule()(q, k_cache, v_cache, lens))
        assert_close(got, reference.decode_attention(q, k_cache, v_cache, lens, 0.125))


def test_prefill_attention_exports_and_matches_eager():
    q, k, v = prefill_inputs(6, 2, 20, 70, 16, torch.float32, seed=4)
    exported = torch.export.export(PrefillModule(), (q, k, v, torch.tensor(50)))
    for offset in (50, 3, 0):
        got = exported.module()(q, k, v, torch.tensor(offset))
        assert torch.equal(got, PrefillModule()(q, k, v, torch.tensor(offset)))
        assert_close(got, reference.prefill_attention(q, k, v, offset, 0.125))
