"""SwiGLU MLP tiled over the intermediate dim, on the CPU.

For each block of `block_i` intermediate units the NKI kernel computes gate and up (fp32 PSUM),
h = silu(gate) * up on chip, and h's share of the down projection, which it adds to an fp32
accumulator of the output: the [T, I] activations never go to HBM. This does the same blocks in the
same order, with fp32 operands (Tensor Engine multiplies bf16 exactly and accumulates in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nki_kernels.tiles import MLP_BLOCK_I, ranges


def swiglu_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    block_i: int = MLP_BLOCK_I,
) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); x [T, H], w_gate/w_up [I, H], w_down [H, I] -> [T, H]."""
    xf = x.float()
    out = xf.new_zeros((x.shape[0], w_down.shape[0]))
    for start, size in ranges(w_gate.shape[0], block_i):
        rows = slice(start, start + size)
        h = F.silu(F.linear(xf, w_gate[rows].float())) * F.linear(xf, w_up[rows].float())
        out += h @ w_down[:, rows].float().t()
    return out.to(x.dtype)
