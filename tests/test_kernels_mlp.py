"""swiglu_mlp: CPU implementation (tiled over the intermediate dim) vs the reference.

Tolerances: nki_kernels.testing (fp32 rtol 1e-4 / atol 1e-5; bf16 rtol 2e-2 / atol 1e-5, with why).
"""

from __future__ import annotations

import pytest
import torch

import nki_kernels
from nki_kernels import reference
from nki_kernels.testing import assert_close, mlp_inputs, randn


# (T, H, I, block_i): I a multiple of the block or not, one block, blocks of one unit.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "T,H,I,block_i", [(1, 64, 128, 32), (5, 96, 200, 64), (33, 576, 1536, 512), (130, 64, 100, 512), (2, 8, 5, 1)]
)
def test_swiglu_mlp_matches_reference(T, H, I, block_i, dtype):  # noqa: E741
    x, w_gate, w_up, w_down = mlp_inputs(T, H, I, dtype, seed=T + I)
    got = nki_kernels.swiglu_mlp(x, w_gate, w_up, w_down, block_i=block_i)
    assert_close(got, reference.swiglu_mlp(x, w_gate, w_up, w_down))


def test_swiglu_mlp_exports_and_matches_eager():
    class MLP(torch.nn.Module):
        def forward(self, x, w_gate, w_up, w_down):
            return nki_kernels.swiglu_mlp(x, w_gate, w_up, w_down, block_i=48)

    g = torch.Generator().manual_seed(0)
    args = (
        randn(3, 32, generator=g),
        randn(100, 32, generator=g),
        randn(100, 32, generator=g),
        randn(32, 100, generator=g),
    )
    exported = torch.export.export(MLP(), args)
    assert torch.equal(exported.module()(*args), MLP()(*args))
