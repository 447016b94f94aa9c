"""NKI: flash-decoding attention over a static KV cache, GQA.

For each slot and kv head, the rep query heads that share it are the partitions (rep <= 128) and
the cache is read once in blocks of DECODE_BLOCK keys. Per block: K^T from four 128-key Tensor
Engine transposes; scores q K^T (one PSUM bank); * scale + length mask bias; block max (stored
negated), exp and row sum in one activation_reduce; P^T @ V as four 128-key matmuls accumulated in
PSUM. The partials (-m_b, l_b, o_b) stay in SBUF; the merge weights them by e^(m_b - M) in block
order and also gives the log-sum-exp of the scaled scores, M + log(sum_b e^(m_b - M) l_b), which the
model needs to merge the step's own key in. Requires L % DECODE_BLOCK == 0 (cache lengths are
bucketed), hd <= 128, S <= 512.
"""

from __future__ import annotations

import nki
import nki.isa as nisa
import nki.language as nl

from nki_kernels.nki.common import broadcast_row, load, psum, sbuf, transpose
from nki_kernels.tiles import DECODE_BLOCK, NEG, PMAX


def _key_transpose(k_cache, s, g, start, D: int, dtype):
    """K[start:start+DECODE_BLOCK]^T as SBUF [D, DECODE_BLOCK], transposed 128 keys at a time."""
    k_t = sbuf((D, DECODE_BLOCK), dtype)
    for c in nl.affine_range(DECODE_BLOCK // PMAX):
        chunk = load(k_cache[s, g, start + c * PMAX : start + (c + 1) * PMAX, 0:D], (PMAX, D), dtype)
        nisa.tensor_copy(dst=k_t[0:D, c * PMAX : (c + 1) * PMAX], src=transpose(chunk, PMAX, D, dtype))
    return k_t


def _block_partial(q_t, k_cache, v_cache, bias, s, g, b, rep: int, D: int, scale: float, neg_max, sums, outs):
    """Writes block b's -max, sum of exp and unnormalised P @ V into neg_max, sums, outs."""
    start = b * DECODE_BLOCK
    scores_psum = psum((rep, DECODE_BLOCK))
    nisa.nc_matmul(dst=scores_psum, stationary=q_t, moving=_key_transpose(k_cache, s, g, start, D, k_cache.dtype))
    scores = sbuf((rep, DECODE_BLOCK), nl.float32)
    nisa.scalar_tensor_tensor(
        dst=scores,
        data=scores_psum,
        op0=nl.multiply,
        operand0=scale,
        op1=nl.add,
        operand1=bias[0:rep, start : start + DECODE_BLOCK],
    )
    nisa.tensor_reduce(dst=neg_max[0:rep, b : b + 1], op=nl.maximum, data=scores, axis=1, negate=True, keepdims=True)
    probs = sbuf((rep, DECODE_BLOCK), v_cache.dtype)  # the Tensor Engine's operand dtype for P @ V
    nisa.activation_reduce(
        dst=probs,
        op=nl.exp,
        data=scores,
        reduce_op=nl.add,
        reduce_res=sums[0:rep, b : b + 1],
        bias=neg_max[0:rep, b : b + 1],
        scale=1.0,
    )
    pv = psum((rep, D))
    for c in nl.affine_range(DECODE_BLOCK // PMAX):
        p_t = transpose(probs[0:rep, c * PMAX : (c + 1) * PMAX], rep, PMAX, v_cache.dtype)
        v = load(v_cache[s, g, start + c * PMAX : start + (c + 1) * PMAX, 0:D], (PMAX, D), v_cache.dtype)
        nisa.nc_matmul(dst=pv, stationary=p_t, moving=v)
    nisa.tensor_copy(dst=outs[0:rep, b, 0:D], src=pv)


def _merge(neg_max, sums, outs, length, rep: int, blocks: int, D: int, dtype):
    """out = sum_b e^(m_b - M) o_b / sum_b e^(m_b - M) l_b, zeroed for a slot of length 0, and
    lse = M + log(sum_b e^(m_b - M) l_b), fp32 [rep, 1]."""
    neg_total_max = sbuf((rep, 1), nl.float32)  # -M = min_b(-m_b)
    nisa.tensor_reduce(dst=neg_total_max, op=nl.minimum, data=neg_max, axis=1, keepdims=True)
    weights = sbuf((rep, blocks), nl.float32)  # e^(m_b - M) = exp(-1 * (-m_b) + (-M))
    nisa.activation(dst=weights, op=nl.exp, data=neg_max, scale=-1.0, bias=neg_total_max)
    weighted_sums = sbuf((rep, blocks), nl.float32)
    nisa.tensor_tensor(dst=weighted_sums, data1=weights, data2=sums, op=nl.multiply)
    total = sbuf((rep, 1), nl.float32)
    nisa.tensor_reduce(dst=total, op=nl.add, data=weighted_sums, axis=1, keepdims=True)
    acc = sbuf((rep, D), nl.float32)
    nisa.memset(dst=acc, value=0.0)
    for b in nl.sequential_range(blocks):
        nisa.scalar_tensor_tensor(
            dst=acc,
            data=outs[0:rep, b, 0:D],
            op0=nl.multiply,
            operand0=weights[0:rep, b : b + 1],
            op1=nl.add,
            operand1=acc,
        )
    inv_total = sbuf((rep, 1), nl.float32)
    nisa.reciprocal(dst=inv_total, data=total)
    has_keys = sbuf((rep, 1), nl.float32)
    nisa.tensor_scalar(dst=has_keys, data=length, op0=nl.greater, operand0=0.0)
    out = sbuf((rep, D), dtype)
    nisa.tensor_scalar(dst=out, data=acc, op0=nl.multiply, operand0=inv_total, op1=nl.multiply, operand1=has_keys)
    # total >= 1 (the block holding M adds e^0), so log is safe. A slot of length 0 has M = NEG, and
    # NEG + log(total) = NEG: finite, yet still 1 for the model's merge weight sigmoid(own - lse).
    lse = sbuf((rep, 1), nl.float32)
    nisa.activation(dst=lse, op=nl.log, data=total)
    nisa.tensor_scalar(dst=lse, data=lse, op0=nl.subtract, operand0=neg_total_max)
    return out, lse


@nki.jit
def decode_attention_kernel(q, k_cache, v_cache, lengths_row, scale: float):
    """q [S, H, D]; k_cache, v_cache [S, G, L, D]; lengths_row fp32 [1, S] -> out [S, H, D] and the
    fp32 log-sum-exp of each head's scaled scores, lse [S, H, 1] (NEG for a slot of length 0)."""
    S, H, D = q.shape
    G, L = k_cache.shape[1], k_cache.shape[2]
    rep, blocks = H // G, L // DECODE_BLOCK
    assert L % DECODE_BLOCK == 0 and D <= PMAX and rep <= PMAX and S <= 512
    out = nl.ndarray((S, H, D), dtype=q.dtype, buffer=nl.shared_hbm)
    # A trailing 1 so that a kv head's rep values are written as the [rep, 1] column they are in SBUF.
    lse = nl.ndarray((S, H, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    lengths = broadcast_row(load(lengths_row, (1, S), nl.float32), rep, S)  # [rep, S]
    key_pos = sbuf((rep, L), nl.float32)
    nisa.iota(dst=key_pos, pattern=[[1, L]], offset=0, channel_multiplier=0)
    for s in nl.affine_range(S):
        # bias = NEG where key position >= length, else 0 (one tensor_scalar for the whole cache row).
        bias = sbuf((rep, L), nl.float32)
        nisa.tensor_scalar(
            dst=bias,
            data=key_pos,
            op0=nl.greater_equal,
            operand0=lengths[0:rep, s : s + 1],
            op1=nl.multiply,
            operand1=NEG,
        )
        for g in nl.affine_range(G):
            q_t = transpose(load(q[s, g * rep : (g + 1) * rep, 0:D], (rep, D), q.dtype), rep, D, q.dtype)
            neg_max, sums = sbuf((rep, blocks), nl.float32), sbuf((rep, blocks), nl.float32)
            outs = sbuf((rep, blocks, D), nl.float32)
            for b in nl.affine_range(blocks):
                _block_partial(q_t, k_cache, v_cache, bias, s, g, b, rep, D, scale, neg_max, sums, outs)
            result, row_lse = _merge(neg_max, sums, outs, lengths[0:rep, s : s + 1], rep, blocks, D, q.dtype)
            nisa.dma_copy(dst=out[s, g * rep : (g + 1) * rep, 0:D], src=result)
            nisa.dma_copy(dst=lse[s, g * rep : (g + 1) * rep, 0:1], src=row_lse)
    return out, lse
