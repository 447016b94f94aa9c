"""q/k/v projections fused with RoPE, on the CPU.

The NKI kernel computes x @ [Wq; Wk; Wv]^T in 512-column PSUM tiles (H contracted in 128-row
chunks, fp32 accumulation) and applies RoPE to each head while the tile is still on chip, before the
single cast and store. Here each projection is one fp32 matmul and RoPE is applied to its fp32
result before the one cast, so the rounding points are the kernel's; only the order of the fp32
sums inside the matmul differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Hugging Face's rotate_half pairing, written per half as the kernel does (no concatenated copy
    # of -x2, x1): out1 = x1*cos1 - x2*sin1, out2 = x2*cos2 + x1*sin2.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out1 = x1 * cos[..., :half] - x2 * sin[..., :half]
    out2 = x2 * cos[..., half:] + x1 * sin[..., half:]
    return torch.cat((out1, out2), dim=-1)


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, heads: int) -> torch.Tensor:
    # fp32 operands, as Tensor Engine multiplies bf16 inputs exactly and accumulates in fp32 PSUM.
    out = F.linear(x, w.float(), None if b is None else b.float())
    return out.view(x.shape[0], heads, -1)


def qkv_rope(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    bq: torch.Tensor | None,
    bk: torch.Tensor | None,
    bv: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] -> q [T, n_heads, hd], k, v [T, n_kv_heads, hd]; RoPE (cos, sin: [T, hd]) on q, k."""
    xf, cosf, sinf = x.float(), cos.float(), sin.float()
    q = _rope(_project(xf, wq, bq, n_heads), cosf, sinf)
    k = _rope(_project(xf, wk, bk, n_kv_heads), cosf, sinf)
    v = _project(xf, wv, bv, n_kv_heads)
    return q.to(x.dtype), k.to(x.dtype), v.to(x.dtype)
