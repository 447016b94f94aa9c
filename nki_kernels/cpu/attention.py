"""Blockwise attention on the CPU: flash-decoding for decode, flash-attention forward for prefill.

Both follow their NKI kernels block for block. Scores are masked by adding a bias of 0 or NEG
(a finite -inf, see tiles.NEG; prefill uses -inf itself, see there), so masked keys contribute
exactly zero and no -inf - -inf NaN can arise; all math is fp32 on fp32-converted operands (Tensor
Engine's bf16 products are exact and its PSUM accumulates in fp32). Nothing branches on tensor
values, so torch.export can trace both.
"""

from __future__ import annotations

import torch

from nki_kernels.tiles import DECODE_BLOCK, NEG, PREFILL_BLOCK_K, PREFILL_BLOCK_Q, ranges


def _block_partials(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-block softmax partials over keys that split into whole blocks of `block`.

    q [S, g, r, D]; k, v [S, g, n*block, D]; bias [S, 1, 1, n*block].
    Returns m, sums [S, g, r, n] (block max, sum of exp(s - m)) and o [S, g, n, r, D] (unnormalised P @ V).
    """
    S, g, r, D = q.shape
    n = k.shape[2] // block
    scores = (q @ k.float().transpose(-1, -2) * scale + bias).view(S, g, r, n, block)
    # A wholly masked block has max -inf; NEG in its place keeps exp(-inf - m) = 0 (no NaN).
    m = scores.amax(dim=-1).clamp(min=NEG)
    p = scores.sub_(m[..., None]).exp_()
    o = p.permute(0, 1, 3, 2, 4) @ v.float().view(S, g, n, block, D)
    return m, p.sum(dim=-1), o


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    block_size: int = DECODE_BLOCK,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q [S, n_heads, hd]; caches [S, n_kv, L, hd]; lengths [S] int64 -> [S, n_heads, hd].

    Slot s attends keys 0..lengths[s]-1 (a slot of length 0 gets zeros). Flash-decoding: the L keys
    split into blocks of `block_size` (the last may be short), each block gives its partial
    (max m_b, sum l_b, unnormalised output o_b), and the partials merge in block order:
    M = max_b m_b, out = sum_b e^(m_b - M) o_b / sum_b e^(m_b - M) l_b.
    Cache entries at or beyond a slot's length must be finite (zeros or stale values, never NaN).

    With `return_lse`, also returns the fp32 log-sum-exp of each (slot, head)'s scaled scores,
    lse [S, n_heads] = M + log(sum_b e^(m_b - M) l_b) (-inf for a slot of length 0), so that a caller
    can merge further keys into the result (the flash-decoding merge once more).
    """
    S, H, D = q.shape
    g, L = k_cache.shape[1], k_cache.shape[2]
    qf = q.float().view(S, g, H // g, D)
    visible = torch.arange(L, device=q.device) < lengths[:, None]
    # -inf rather than the kernel's NEG: exact zeros either way, and the CPU's exp is several times
    # slower on -1e30 than on -inf. Wholly masked blocks are handled in _block_partials.
    bias = torch.where(visible, 0.0, float("-inf")).view(S, 1, 1, L)
    whole = L - L % block_size
    # Whole blocks are done together (a batch of blocks); a short last block is its own batch.
    groups = [(0, whole, block_size)] if whole else []
    if L % block_size:
        groups.append((whole, L - whole, L - whole))
    partials = [
        _block_partials(qf, k_cache[:, :, s : s + n], v_cache[:, :, s : s + n], bias[..., s : s + n], scale, b)
        for s, n, b in groups
    ]
    m = torch.cat([p[0] for p in partials], dim=-1)
    sums = torch.cat([p[1] for p in partials], dim=-1)
    o = torch.cat([p[2] for p in partials], dim=2)
    m_max = m.amax(dim=-1, keepdim=True)
    weight = torch.exp(m - m_max)  # [S, g, r, blocks]
    total = (weight * sums).sum(dim=-1)
    out = (o * weight.permute(0, 1, 3, 2)[..., None]).sum(dim=2) / total[..., None]
    out = torch.where((lengths > 0).view(S, 1, 1, 1), out, 0.0)  # an empty slot is 0 / 0 above
    out = out.reshape(S, H, D).to(q.dtype)
    if not return_lse:
        return out
    # An empty slot has total = 0 (every block wholly masked), so its lse is NEG + log(0) = -inf.
    return out, (m_max[..., 0] + torch.log(total)).reshape(S, H)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offset: int | torch.Tensor,
    scale: float,
    block_q: int = PREFILL_BLOCK_Q,
    block_k: int = PREFILL_BLOCK_K,
) -> torch.Tensor:
    """q [n_heads, T, hd]; k, v [n_kv, Lk, hd] -> [n_heads, T, hd], causal: query i sees key j iff
    j <= q_offset + i (q_offset = tokens already in the cache; an int or a 0-dim int64 tensor).

    Flash-attention forward: per block of `block_q` queries, the keys go by in blocks of `block_k`
    with the online-softmax update m' = max(m, rowmax s), l' = l e^(m - m') + rowsum e^(s - m'),
    acc' = acc e^(m - m') + e^(s - m') V; out = acc / l. When q_offset is an int, key blocks wholly after the last
    query's horizon are skipped (they would add exactly zero); a tensor q_offset visits every block.
    """
    H, T, D = q.shape
    g, Lk = k.shape[0], k.shape[1]
    rep = H // g
    qf, kf, vf = q.float().view(g, rep, T, D), k.float(), v.float()
    offset = torch.as_tensor(q_offset, device=q.device)
    key_pos = torch.arange(Lk, device=q.device)
    outputs = []
    for qs, qn in ranges(T, block_q):
        # The rep heads that share a kv head are stacked as rep * qn rows, so each block is one bmm.
        rows = qf[:, :, qs : qs + qn].reshape(g, rep * qn, D)
        horizon = (offset + qs + torch.arange(qn, device=q.device)).repeat(rep)  # last key a row sees
        m = rows.new_full((g, rep * qn, 1), NEG)
        sums = rows.new_zeros((g, rep * qn, 1))
        acc = rows.new_zeros((g, rep * qn, D))
        for ks, kn in ranges(Lk, block_k):
            if isinstance(q_offset, int) and ks > q_offset + qs + qn - 1:
                break
            keys = slice(ks, ks + kn)
            # -inf rather than the kernel's NEG: the CPU's exp is several times slower on -1e30 than on
            # -inf, both give exactly 0, and key 0 is visible to every query, so m is finite from the
            # first block on and no -inf - -inf can occur.
            bias = torch.where(key_pos[keys][None, :] <= horizon[:, None], 0.0, float("-inf"))
            # bias + scale * (q K^T) in one op; exp in place: fewer passes over the block's scores.
            scores = torch.baddbmm(bias, rows, kf[:, keys].transpose(1, 2), alpha=scale)
            m_new = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
            alpha = torch.exp(m - m_new)
            p = scores.sub_(m_new).exp_()
            sums = sums * alpha + p.sum(dim=-1, keepdim=True)
            acc = torch.baddbmm(acc * alpha, p, vf[:, keys])
            m = m_new
        outputs.append((acc / sums).view(g, rep, qn, D))
    return torch.cat(outputs, dim=2).reshape(H, T, D).to(q.dtype)
