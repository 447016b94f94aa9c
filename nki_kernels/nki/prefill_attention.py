"""NKI: causal flash-attention forward for (chunked) prefill, GQA.

Per head and block of 128 queries (the partitions), the keys go by in blocks of 512 (one PSUM bank
of scores) with the online-softmax update: m' = max(m, rowmax s); alpha = e^(m - m');
l' = l alpha + rowsum e^(s - m'); acc' = acc alpha + e^(s - m') V, P^T @ V as four 128-key matmuls
accumulated in PSUM. The causal limit comes from q_offset at run time (key j visible to query i iff
j < q_offset + i + 1), applied as a 0 / NEG bias, so one compiled kernel serves every chunk.
Requires T % 128 == 0 and Lk % 512 == 0 (bucketed shapes), hd <= 128.
"""

from __future__ import annotations

import nki
import nki.isa as nisa
import nki.language as nl

from nki_kernels.nki.common import broadcast_row, load, psum, sbuf, transpose
from nki_kernels.tiles import NEG, PMAX, PREFILL_BLOCK_K, PREFILL_BLOCK_Q


def _key_block_t(k, g, kb, D: int):
    """K[g, kb-th block]^T as SBUF [D, PREFILL_BLOCK_K]."""
    k_t = sbuf((D, PREFILL_BLOCK_K), k.dtype)
    for c in nl.affine_range(PREFILL_BLOCK_K // PMAX):
        start = kb * PREFILL_BLOCK_K + c * PMAX
        chunk = load(k[g, start : start + PMAX, 0:D], (PMAX, D), k.dtype)
        nisa.tensor_copy(dst=k_t[0:D, c * PMAX : (c + 1) * PMAX], src=transpose(chunk, PMAX, D, k.dtype))
    return k_t


def _online_step(q_t, k, v, g, kb, bound, key_pos, scale: float, D: int, state) -> None:
    """One key block of the online softmax; state = (m, l, acc) SBUF tiles, updated in place."""
    m, sums, acc = state
    rows, width = PREFILL_BLOCK_Q, PREFILL_BLOCK_K
    scores_psum = psum((rows, width))
    nisa.nc_matmul(dst=scores_psum, stationary=q_t, moving=_key_block_t(k, g, kb, D))
    bias = sbuf((rows, width), nl.float32)  # NEG where key position >= q_offset + i + 1
    nisa.tensor_scalar(
        dst=bias,
        data=key_pos[0:rows, kb * width : (kb + 1) * width],
        op0=nl.greater_equal,
        operand0=bound,
        op1=nl.multiply,
        operand1=NEG,
    )
    scores = sbuf((rows, width), nl.float32)
    nisa.scalar_tensor_tensor(dst=scores, data=scores_psum, op0=nl.multiply, operand0=scale, op1=nl.add, operand1=bias)
    block_max = sbuf((rows, 1), nl.float32)
    nisa.tensor_reduce(dst=block_max, op=nl.maximum, data=scores, axis=1, keepdims=True)
    neg_new_max = sbuf((rows, 1), nl.float32)
    nisa.tensor_tensor(dst=block_max, data1=block_max, data2=m, op=nl.maximum)
    nisa.tensor_scalar(dst=neg_new_max, data=block_max, op0=nl.multiply, operand0=-1.0)
    alpha = sbuf((rows, 1), nl.float32)
    nisa.activation(dst=alpha, op=nl.exp, data=m, bias=neg_new_max, scale=1.0)
    probs = sbuf((rows, width), v.dtype)
    row_sum = sbuf((rows, 1), nl.float32)
    nisa.activation_reduce(
        dst=probs, op=nl.exp, data=scores, reduce_op=nl.add, reduce_res=row_sum, bias=neg_new_max, scale=1.0
    )
    nisa.scalar_tensor_tensor(dst=sums, data=sums, op0=nl.multiply, operand0=alpha, op1=nl.add, operand1=row_sum)
    pv = psum((rows, D))
    for c in nl.affine_range(width // PMAX):
        p_t = transpose(probs[0:rows, c * PMAX : (c + 1) * PMAX], rows, PMAX, v.dtype)
        start = kb * width + c * PMAX
        nisa.nc_matmul(dst=pv, stationary=p_t, moving=load(v[g, start : start + PMAX, 0:D], (PMAX, D), v.dtype))
    nisa.scalar_tensor_tensor(dst=acc, data=acc, op0=nl.multiply, operand0=alpha, op1=nl.add, operand1=pv)
    nisa.tensor_copy(dst=m, src=block_max)


@nki.jit
def prefill_attention_kernel(q, k, v, q_offset, scale: float):
    """q [H, T, D]; k, v [G, Lk, D]; q_offset fp32 [1, 1] -> out [H, T, D]."""
    H, T, D = q.shape
    G, Lk = k.shape[0], k.shape[1]
    rep, q_blocks, k_blocks = H // G, T // PREFILL_BLOCK_Q, Lk // PREFILL_BLOCK_K
    assert T % PREFILL_BLOCK_Q == 0 and Lk % PREFILL_BLOCK_K == 0 and D <= PMAX
    out = nl.ndarray((H, T, D), dtype=q.dtype, buffer=nl.shared_hbm)
    offset = broadcast_row(load(q_offset, (1, 1), nl.float32), PMAX, 1)
    # bounds[p, qb] = q_offset + qb * 128 + p + 1: query row p of block qb sees keys below it.
    bounds = sbuf((PMAX, q_blocks), nl.float32)
    nisa.iota(dst=bounds, pattern=[[PREFILL_BLOCK_Q, q_blocks]], offset=1, channel_multiplier=1)
    nisa.tensor_scalar(dst=bounds, data=bounds, op0=nl.add, operand0=offset)
    key_pos = sbuf((PMAX, Lk), nl.float32)
    nisa.iota(dst=key_pos, pattern=[[1, Lk]], offset=0, channel_multiplier=0)
    for g in nl.affine_range(G):
        for r in nl.affine_range(rep):
            for qb in nl.affine_range(q_blocks):
                q0 = qb * PREFILL_BLOCK_Q
                q_tile = load(q[g * rep + r, q0 : q0 + PREFILL_BLOCK_Q, 0:D], (PREFILL_BLOCK_Q, D), q.dtype)
                q_t = transpose(q_tile, PREFILL_BLOCK_Q, D, q.dtype)
                m, sums = sbuf((PMAX, 1), nl.float32), sbuf((PMAX, 1), nl.float32)
                acc = sbuf((PMAX, D), nl.float32)
                nisa.memset(dst=m, value=NEG)
                nisa.memset(dst=sums, value=0.0)
                nisa.memset(dst=acc, value=0.0)
                for kb in nl.sequential_range(k_blocks):
                    _online_step(q_t, k, v, g, kb, bounds[0:PMAX, qb : qb + 1], key_pos, scale, D, (m, sums, acc))
                inv_sums = sbuf((PMAX, 1), nl.float32)
                nisa.reciprocal(dst=inv_sums, data=sums)
                result = sbuf((PMAX, D), q.dtype)
                nisa.tensor_scalar(dst=result, data=acc, op0=nl.multiply, operand0=inv_sums)
                nisa.dma_copy(dst=out[g * rep + r, q0 : q0 + PREFILL_BLOCK_Q, 0:D], src=result)
    return out
