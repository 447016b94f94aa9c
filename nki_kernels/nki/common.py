"""Small building blocks shared by the NKI kernels (plain functions, traced inline by @nki.jit).

Written against the NKI 0.5 API (nki.isa with explicit `dst`, nl.ndarray buffers); see the
package README for what has and has not been run.
"""

from __future__ import annotations

import nki.isa as nisa
import nki.language as nl


def sbuf(shape: tuple[int, ...], dtype) -> object:
    return nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf)


def psum(shape: tuple[int, ...]) -> object:
    # nc_matmul writes fp32 PSUM on NeuronCore-v2/v3.
    return nl.ndarray(shape, dtype=nl.float32, buffer=nl.psum)


def load(src, shape: tuple[int, ...], dtype) -> object:
    """HBM slice -> new SBUF tile (DMA)."""
    tile = sbuf(shape, dtype)
    nisa.dma_copy(dst=tile, src=src)
    return tile


def transpose(src, rows: int, cols: int, dtype) -> object:
    """SBUF [rows, cols] (both <= 128) -> SBUF [cols, rows] through the Tensor Engine.

    nc_transpose leaves its result in PSUM with the input's dtype; it is copied to SBUF because
    nc_matmul reads its operands from SBUF only.
    """
    staged = nl.ndarray((cols, rows), dtype=dtype, buffer=nl.psum)
    nisa.nc_transpose(dst=staged, data=src)
    out = sbuf((cols, rows), dtype)
    nisa.tensor_copy(dst=out, src=staged)
    return out


def broadcast_row(row, parts: int, width: int) -> object:
    """SBUF fp32 [1, width] -> SBUF fp32 [parts, width], every partition a copy of the row.

    Done as ones[1, parts]^T @ row on the Tensor Engine (contraction over a single partition), the
    usual way to spread a per-call scalar such as a length or an offset across partitions.
    """
    ones = sbuf((1, parts), nl.float32)
    nisa.memset(dst=ones, value=1.0)
    spread = psum((parts, width))
    nisa.nc_matmul(dst=spread, stationary=ones, moving=row)
    out = sbuf((parts, width), nl.float32)
    nisa.tensor_copy(dst=out, src=spread)
    return out


def column(value: float, parts: int) -> object:
    """SBUF fp32 [parts, 1] filled with a constant (activation's bias must be a vector on v2)."""
    out = sbuf((parts, 1), nl.float32)
    nisa.memset(dst=out, value=value)
    return out
