"""Residual add fused with RMSNorm, on the CPU.

The NKI kernel puts 128 rows on the partitions and the whole hidden dim in the free dim, so each row
is one pass: add, square-and-sum (one activation_reduce), rsqrt, two multiplies. Rows are
independent, so the CPU version is the same per-row computation over all rows at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm_residual(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual): new_residual = x + residual (x when residual is None), in x.dtype;
    normed = RMSNorm(new_residual) * weight computed in fp32, returned in x.dtype. x: [T, H] (or any
    leading dims: rows are independent; the NKI kernel takes [T, H])."""
    new_residual = x if residual is None else x + residual
    # torch's rms_norm is one fused pass over each row on the CPU (x * rsqrt(mean(x^2) + eps) * w).
    normed = F.rms_norm(new_residual.float(), (x.shape[-1],), weight.float(), eps)
    return normed.to(x.dtype), new_residual
