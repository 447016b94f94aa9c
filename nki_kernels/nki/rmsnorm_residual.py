"""NKI: residual add fused with RMSNorm.

Rows go on the partitions (128 at a time), the hidden dim in the free dim. Per tile: x + residual
(rounded to x.dtype, the residual stream the model keeps), stored; square-and-sum in one
activation_reduce on the Scalar Engine; rsqrt(sum / H + eps); (h * rstd) * weight in one
scalar_tensor_tensor; cast and store. One read of x and residual, one write of each output.
"""

from __future__ import annotations

import nki
import nki.isa as nisa
import nki.language as nl

from nki_kernels.nki.common import column, load, sbuf
from nki_kernels.tiles import PMAX, ranges


def _normalize_rows(x, residual, weight, eps: float, normed, new_residual, add_residual: bool) -> None:
    T, H = x.shape
    w = load(weight.broadcast(dim=0, size=PMAX), (PMAX, H), weight.dtype)
    eps_column = column(eps, PMAX)
    for start, rows in ranges(T, PMAX):
        h = load(x[start : start + rows, 0:H], (rows, H), x.dtype)
        if add_residual:  # a Python bool: decided while tracing
            r = load(residual[start : start + rows, 0:H], (rows, H), residual.dtype)
            nisa.tensor_tensor(dst=h, data1=h, data2=r, op=nl.add)
            nisa.dma_copy(dst=new_residual[start : start + rows, 0:H], src=h)
        squares = sbuf((rows, H), nl.float32)
        sum_sq = sbuf((rows, 1), nl.float32)
        nisa.activation_reduce(dst=squares, op=nl.square, data=h, reduce_op=nl.add, reduce_res=sum_sq)
        rstd = sbuf((rows, 1), nl.float32)
        nisa.activation(dst=rstd, op=nl.rsqrt, data=sum_sq, scale=1.0 / H, bias=eps_column[0:rows, 0:1])
        out = sbuf((rows, H), x.dtype)
        nisa.scalar_tensor_tensor(
            dst=out, data=h, op0=nl.multiply, operand0=rstd, op1=nl.multiply, operand1=w[0:rows, 0:H]
        )
        nisa.dma_copy(dst=normed[start : start + rows, 0:H], src=out)


@nki.jit
def rmsnorm_residual_kernel(x, residual, weight, eps: float):
    """x, residual [T, H]; weight [1, H] -> (normed [T, H], new_residual [T, H]), both x.dtype."""
    normed = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    new_residual = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    _normalize_rows(x, residual, weight, eps, normed, new_residual, add_residual=True)
    return normed, new_residual


@nki.jit
def rmsnorm_kernel(x, weight, eps: float):
    """The residual-free form (first layer): x [T, H]; weight [1, H] -> normed [T, H]."""
    normed = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    _normalize_rows(x, x, weight, eps, normed, normed, add_residual=False)
    return normed
