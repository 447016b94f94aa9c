"""sample: the tiled CPU sampler vs the reference, and its properties (hypothesis).

Token ids are compared exactly: both sides use the same fp32 weights and fp64 running sums, so they
can only disagree on exactly tied logits, which the inputs here avoid (except where a property is
checked that holds under ties too).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nki_kernels
from nki_kernels import reference


def _distinct_logits(S: int, V: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random logits without ties, even in bf16: distinct representable values, shuffled per row.
    bf16 has too few values near randn * 3 for a large vocabulary, so its magnitudes spread over
    2^-20..2^4."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bfloat16:
        sign = torch.randint(0, 2, (8 * V,), generator=g) * 2 - 1
        values = sign * torch.exp2(torch.rand(8 * V, generator=g) * 24 - 20)
    else:
        values = torch.randn(8 * V, generator=g) * 3
    pool = torch.unique(values.to(dtype).float())
    assert pool.numel() >= V
    rows = [pool[torch.randperm(pool.numel(), generator=g)[:V]] for _ in range(S)]
    return torch.stack(rows).to(dtype)


def _settings(S: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Per-row settings covering greedy, top-k only, top-p only, both, and neither."""
    g = torch.Generator().manual_seed(seed)
    temperature = torch.rand(S, generator=g) * 1.5 + 0.1
    top_k = torch.randint(1, 60, (S,), generator=g)
    top_p = torch.rand(S, generator=g) * 0.98 + 0.01
    kind = torch.arange(S) % 5
    temperature[kind == 0] = 0.0
    top_k[kind == 2] = 0
    top_p[kind == 1] = 1.0
    top_k[kind == 4], top_p[kind == 4] = 0, 1.0
    return temperature, top_k, top_p, torch.rand(S, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V,tile,cap", [(1000, 128, 64), (300, 300, 16), (4097, 1024, 256), (50, 7, 8)])
def test_sample_matches_reference(V, tile, cap, dtype):
    S = 40
    logits = _distinct_logits(S, V, dtype, seed=V)
    temperature, top_k, top_p, uniform = _settings(S, seed=V + 1)
    got = nki_kernels.sample(logits, temperature, top_k, top_p, uniform, tile=tile, max_candidates=cap)
    want = reference.sample(logits, temperature, top_k, top_p, uniform, max_candidates=cap)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def _allowed(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The Hugging Face allowed set (top-k, then the top-p nucleus of the renormalised rest; ties at a
    cut kept), with no candidate cap. A sampled token must lie in it."""
    x = logits.float() / temperature
    weights = torch.exp(x - x.max()).double()
    keep = torch.ones_like(x, dtype=torch.bool)
    if top_k > 0:
        keep &= x >= torch.sort(x, descending=True).values[min(top_k, x.numel()) - 1]
    if top_p < 1.0:
        order = torch.sort(torch.where(keep, x, float("-inf")), descending=True).indices[: int(keep.sum())]
        w = weights[order]
        inside = (torch.cumsum(w, 0) - w) < top_p * w.sum()
        keep &= x >= x[order[int(inside.sum().clamp(min=1)) - 1]]
    return keep


@settings(max_examples=30, deadline=None)
@given(
    S=st.integers(1, 4),
    V=st.integers(1, 200),
    tile=st.integers(1, 128),
    cap=st.sampled_from([8, 16, 64]),
    integer_logits=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_filtered_samples_stay_in_the_allowed_set(S, V, tile, cap, integer_logits, seed, data):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (S, V), generator=g).float() if integer_logits else torch.randn(S, V, generator=g)
    temperature = torch.tensor(data.draw(st.lists(st.floats(0.05, 2.0), min_size=S, max_size=S)))
    top_k = torch.tensor(data.draw(st.lists(st.integers(0, V + 2), min_size=S, max_size=S)))
    top_p = torch.tensor(data.draw(st.lists(st.floats(0.01, 1.0), min_size=S, max_size=S)))
    uniform = torch.rand(S, generator=g)
    ids = nki_kernels.sample(logits, temperature, top_k, top_p, uniform, tile=tile, max_candidates=cap)
    for row in range(S):
        allowed = _allowed(logits[row], float(temperature[row]), int(top_k[row]), float(top_p[row]))
        assert allowed[ids[row]], (row, ids[row])


@settings(max_examples=25, deadline=None)
@given(S=st.integers(1, 5), V=st.integers(2, 400), tile=st.integers(8, 200), seed=st.integers(0, 2**16))
def test_same_uniform_same_ids_whatever_the_tiling(S, V, tile, seed):
    logits = torch.randn(S, V, generator=torch.Generator().manual_seed(seed))
    temperature, top_k, top_p, uniform = _settings(S, seed)
    first = nki_kernels.sample(logits, temperature, top_k, top_p, uniform, tile=tile)
    assert torch.equal(first, nki_kernels.sample(logits, temperature, top_k, top_p, uniform, tile=tile))
    assert torch.equal(first, nki_kernels.sample(logits, temperature, top_k, top_p, uniform, tile=V))


@settings(max_examples=25, deadline=None)
@given(S=st.integers(1, 5), V=st.integers(1, 300), tile=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_temperature_zero_is_argmax(S, V, tile, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-2, 3, (S, V), generator=g).float()  # many ties: the first max wins
    ids = nki_kernels.sample(
        logits,
        torch.zeros(S),
        torch.randint(0, 5, (S,), generator=g),
        torch.rand(S, generator=g),
        torch.rand(S, generator=g),
        tile=tile,
    )
    assert torch.equal(ids, logits.argmax(dim=-1))


def test_top_k_one_is_argmax_whatever_the_temperature():
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(0))
    ids = nki_kernels.sample(
        logits, torch.linspace(0.1, 2.0, 8), torch.ones(8, dtype=torch.int64), torch.ones(8), torch.rand(8), tile=64
    )
    assert torch.equal(ids, logits.argmax(dim=-1))


def test_sample_exports_and_matches_eager():
    class Sampler(torch.nn.Module):
        def forward(self, logits, temperature, top_k, top_p, uniform):
            return nki_kernels.sample(logits, temperature, top_k, top_p, uniform, tile=64, max_candidates=16)

    logits = torch.randn(5, 200, generator=torch.Generator().manual_seed(1))
    args = (logits, *_settings(5, seed=2))
    exported = torch.export.export(Sampler(), args)
    assert torch.equal(exported.module()(*args), Sampler()(*args))
