"""NKI: SwiGLU MLP, down(silu(gate(x)) * up(x)), with the [T, I] activations kept on chip.

Layouts (prepared once at weight-load time): w_gate_t, w_up_t [H, I] and w_down_t [I, H], so every
contraction dim lies on the partitions. Per tile of up to 128 tokens:
  1. for each 128-unit slice of I: gate^T and up^T [128, T] (H accumulated in PSUM), then
     h^T = silu(gate^T) * up^T into SBUF (the intermediate never goes to HBM);
  2. for each 512-column slice of H: the down projection accumulated over all I slices in one PSUM
     bank (fp32), cast, stored.
The CPU twin (cpu/mlp.py) walks I in MLP_BLOCK_I blocks and adds each block's share of the down
projection to an fp32 accumulator: the same sum, grouped 512 at a time instead of 128.
Requires I % 128 == 0.
"""

from __future__ import annotations

import nki
import nki.isa as nisa
import nki.language as nl

from nki_kernels.nki.common import load, psum, sbuf, transpose
from nki_kernels.tiles import PMAX, PSUM_FMAX, ranges


def _hidden_t(x_t: list, w_gate_t, w_up_t, i_slices: int, rows: int, dtype):
    """h^T [128, I/128, rows] in SBUF: silu(x Wg^T) * (x Wu^T), transposed, per 128-unit slice of I."""
    H = w_gate_t.shape[0]
    h_t = sbuf((PMAX, i_slices, rows), dtype)
    for it in nl.affine_range(i_slices):
        gate, up = psum((PMAX, rows)), psum((PMAX, rows))
        h_chunks = ranges(H, PMAX)
        for c in range(len(h_chunks)):
            h0, hn = h_chunks[c]
            w_gate = load(w_gate_t[h0 : h0 + hn, it * PMAX : (it + 1) * PMAX], (hn, PMAX), dtype)
            nisa.nc_matmul(dst=gate, stationary=w_gate, moving=x_t[c])
            w_up = load(w_up_t[h0 : h0 + hn, it * PMAX : (it + 1) * PMAX], (hn, PMAX), dtype)
            nisa.nc_matmul(dst=up, stationary=w_up, moving=x_t[c])
        silu_gate = sbuf((PMAX, rows), nl.float32)
        nisa.activation(dst=silu_gate, op=nl.silu, data=gate)
        nisa.tensor_tensor(dst=h_t[0:PMAX, it, 0:rows], data1=silu_gate, data2=up, op=nl.multiply)
    return h_t


@nki.jit
def swiglu_mlp_kernel(x, w_gate_t, w_up_t, w_down_t):
    """x [T, H]; w_gate_t, w_up_t [H, I]; w_down_t [I, H] -> [T, H] in x.dtype."""
    T, H = x.shape
    I = w_gate_t.shape[1]  # noqa: E741 - the usual name of the intermediate size
    assert I % PMAX == 0
    out = nl.ndarray((T, H), dtype=x.dtype, buffer=nl.shared_hbm)
    for start, rows in ranges(T, PMAX):
        x_tile = load(x[start : start + rows, 0:H], (rows, H), x.dtype)
        x_t = []
        for h0, hn in ranges(H, PMAX):
            x_t.append(transpose(x_tile[0:rows, h0 : h0 + hn], rows, hn, x.dtype))
        h_t = _hidden_t(x_t, w_gate_t, w_up_t, I // PMAX, rows, x.dtype)
        for c0, cols in ranges(H, PSUM_FMAX):
            down = psum((rows, cols))
            for it in nl.affine_range(I // PMAX):
                w = load(w_down_t[it * PMAX : (it + 1) * PMAX, c0 : c0 + cols], (PMAX, cols), w_down_t.dtype)
                nisa.nc_matmul(dst=down, stationary=h_t[0:PMAX, it, 0:rows], moving=w)
            result = sbuf((rows, cols), x.dtype)
            nisa.tensor_copy(dst=result, src=down)
            nisa.dma_copy(dst=out[start : start + rows, c0 : c0 + cols], src=result)
    return out
