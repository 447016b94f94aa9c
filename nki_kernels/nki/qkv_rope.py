"""NKI: q/k/v projections fused with RoPE.

Layouts (the Neuron backend prepares them once, at weight-load time): w_qkv_t [H, F] is
[Wq; Wk; Wv]^T, F = (n_heads + 2 n_kv_heads) * hd, so the contraction dim H lies on the partitions
as nc_matmul needs; bias [1, F] (zeros when the model has none); cos, sin [T, hd].

Per tile of up to 128 tokens: x^T in 128-row chunks (Tensor Engine transposes); for each group of
heads that fits one PSUM bank (512 fp32 columns), x @ W^T accumulated over the H chunks; + bias;
RoPE on q and k heads while the fp32 tile is on chip; one cast; store.
"""

from __future__ import annotations

import nki
import nki.isa as nisa
import nki.language as nl

from nki_kernels.nki.common import load, psum, sbuf, transpose
from nki_kernels.tiles import PMAX, PSUM_FMAX, ranges


def _rope_head(dst, tile, col: int, cos, sin, rows: int, hd: int) -> None:
    """dst = src * cos + rotate_half(src) * sin, src = the head at columns col..col+hd of the fp32
    tile (sliced here, once: the kernels keep to NKI 0.3's single level of slicing)."""
    half = hd // 2
    x1, x2 = tile[0:rows, col : col + half], tile[0:rows, col + half : col + hd]
    a, b = sbuf((rows, half), nl.float32), sbuf((rows, half), nl.float32)
    nisa.tensor_tensor(dst=a, data1=x1, data2=cos[0:rows, 0:half], op=nl.multiply)
    nisa.tensor_tensor(dst=b, data1=x2, data2=sin[0:rows, 0:half], op=nl.multiply)
    nisa.tensor_tensor(dst=dst[0:rows, 0:half], data1=a, data2=b, op=nl.subtract)
    nisa.tensor_tensor(dst=a, data1=x2, data2=cos[0:rows, half:hd], op=nl.multiply)
    nisa.tensor_tensor(dst=b, data1=x1, data2=sin[0:rows, half:hd], op=nl.multiply)
    nisa.tensor_tensor(dst=dst[0:rows, half:hd], data1=a, data2=b, op=nl.add)


def _head_tiles(n_heads: int, n_kv_heads: int, hd: int) -> list[tuple[int, int]]:
    """(first head, head count) of each PSUM-bank-wide group of the n_heads + 2 n_kv_heads heads."""
    return ranges(n_heads + 2 * n_kv_heads, max(1, PSUM_FMAX // hd))


def _transposed_chunks(x, start: int, rows: int) -> list:
    """x[start:start+rows]^T as SBUF tiles [<=128, rows], one per 128-row chunk of H."""
    H = x.shape[1]
    x_tile = load(x[start : start + rows, 0:H], (rows, H), x.dtype)
    chunks = []
    for h0, hn in ranges(H, PMAX):
        chunks.append(transpose(x_tile[0:rows, h0 : h0 + hn], rows, hn, x.dtype))
    return chunks


def _project_tile(x_t: list, w_qkv_t, bias_rows, rows: int, first_head: int, count: int, hd: int):
    """fp32 SBUF [rows, count * hd]: x @ W^T for heads first_head.. (+ bias), H accumulated in PSUM."""
    cols, col0 = count * hd, first_head * hd
    acc = psum((rows, cols))
    h_chunks = ranges(w_qkv_t.shape[0], PMAX)
    for c in range(len(h_chunks)):
        h0, hn = h_chunks[c]
        w = load(w_qkv_t[h0 : h0 + hn, col0 : col0 + cols], (hn, cols), w_qkv_t.dtype)
        nisa.nc_matmul(dst=acc, stationary=x_t[c], moving=w)
    out = sbuf((rows, cols), nl.float32)
    nisa.tensor_tensor(dst=out, data1=acc, data2=bias_rows[0:rows, col0 : col0 + cols], op=nl.add)
    return out


def _qkv_heads(x, w_qkv_t, bias, cos, sin, n_heads: int, n_kv_heads: int, outputs) -> None:
    """Projection + RoPE, each finished head handed to _store_head; outputs = (q, k, v) HBM tensors."""
    T = x.shape[0]
    hd = cos.shape[1]
    F = w_qkv_t.shape[1]
    bias_rows = load(bias.broadcast(dim=0, size=PMAX), (PMAX, F), bias.dtype)
    for start, rows in ranges(T, PMAX):
        cos_t = load(cos[start : start + rows, 0:hd], (rows, hd), nl.float32)
        sin_t = load(sin[start : start + rows, 0:hd], (rows, hd), nl.float32)
        x_t = _transposed_chunks(x, start, rows)
        for first, count in _head_tiles(n_heads, n_kv_heads, hd):
            tile = _project_tile(x_t, w_qkv_t, bias_rows, rows, first, count, hd)
            for j in range(count):
                head = first + j
                src = tile[0:rows, j * hd : (j + 1) * hd]
                if head < n_heads + n_kv_heads:  # q and k heads get RoPE, v heads do not
                    rotated = sbuf((rows, hd), nl.float32)
                    _rope_head(rotated, tile, j * hd, cos_t, sin_t, rows, hd)
                    src = rotated
                _store_head(src, head, n_heads, n_kv_heads, start, rows, hd, outputs)


def _store_head(src, head: int, n_heads: int, n_kv_heads: int, start: int, rows: int, hd: int, outputs) -> None:
    """Casts one fp32 head tile and stores it as a column block of q, k or v."""
    kind = 0 if head < n_heads else (1 if head < n_heads + n_kv_heads else 2)
    index = head - (0, n_heads, n_heads + n_kv_heads)[kind]
    dst = outputs[kind]
    value = sbuf((rows, hd), dst.dtype)
    nisa.tensor_copy(dst=value, src=src)
    nisa.dma_copy(dst=dst[start : start + rows, index * hd : (index + 1) * hd], src=value)


@nki.jit
def qkv_rope_kernel(x, w_qkv_t, bias, cos, sin, n_heads: int, n_kv_heads: int):
    """x [T, H] -> q [T, n_heads*hd], k, v [T, n_kv_heads*hd] in x.dtype (RoPE on q and k)."""
    T, hd = x.shape[0], cos.shape[1]
    q = nl.ndarray((T, n_heads * hd), dtype=x.dtype, buffer=nl.shared_hbm)
    k = nl.ndarray((T, n_kv_heads * hd), dtype=x.dtype, buffer=nl.shared_hbm)
    v = nl.ndarray((T, n_kv_heads * hd), dtype=x.dtype, buffer=nl.shared_hbm)
    _qkv_heads(x, w_qkv_t, bias, cos, sin, n_heads, n_kv_heads, (q, k, v))
    return q, k, v
