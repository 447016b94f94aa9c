"""Plain-PyTorch references: these functions define what every fused kernel must compute.

They favour clarity over speed (untiled, one op per step, per-row loops where that reads better).
Inputs may be fp32 or bf16; the math runs in fp32 and results come back in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nki_kernels.tiles import MAX_CANDIDATES


def rmsnorm_residual(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """new_residual = x + residual (in x.dtype, as the model's residual stream);
    normed = new_residual / rms(new_residual) * weight, in fp32, returned in x.dtype."""
    new_residual = x if residual is None else x + residual
    h = new_residual.float()
    normed = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return normed.to(x.dtype), new_residual


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's non-interleaved RoPE pairing: (x1, x2) -> (-x2, x1) over the two halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, head_dim]; cos, sin: [..., head_dim], the same for every head (e.g. x
    [T, heads, hd] with cos [T, hd], or x [B, T, heads, hd] with cos [B, T, hd] or [T, hd])."""
    return x * cos.unsqueeze(-2) + rotate_half(x) * sin.unsqueeze(-2)


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
    """q, k, v projections of x [T, H] (nn.Linear weights [out, in]); RoPE on q and k."""
    T = x.shape[0]
    xf, cos, sin = x.float(), cos.float(), sin.float()

    def project(w: torch.Tensor, b: torch.Tensor | None, heads: int) -> torch.Tensor:
        return F.linear(xf, w.float(), None if b is None else b.float()).view(T, heads, -1)

    q = apply_rope(project(wq, bq, n_heads), cos, sin)
    k = apply_rope(project(wk, bk, n_kv_heads), cos, sin)
    v = project(wv, bv, n_kv_heads)
    return q.to(x.dtype), k.to(x.dtype), v.to(x.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q [S, H, hd]; caches [S, n_kv, L, hd]; slot s attends keys 0..lengths[s]-1 (GQA: head h uses
    kv head h // (H // n_kv)). A slot of length 0 gets zeros. With `return_lse`, also the fp32
    log-sum-exp [S, H] of each row's visible scaled scores (-inf for a slot of length 0)."""
    S, H, _ = q.shape
    rep = H // k_cache.shape[1]
    k = k_cache.float().repeat_interleave(rep, dim=1)
    v = v_cache.float().repeat_interleave(rep, dim=1)
    scores = torch.einsum("shd,shld->shl", q.float(), k) * scale
    visible = torch.arange(k.shape[2]) < lengths[:, None]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row is NaN: zeros instead
    out = torch.einsum("shl,shld->shd", probs, v).to(q.dtype)
    return (out, torch.logsumexp(scores, dim=-1)) if return_lse else out


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int | torch.Tensor, scale: float
) -> torch.Tensor:
    """q [H, T, hd]; k, v [n_kv, Lk, hd]; query i sees key j iff j <= q_offset + i."""
    H, T, _ = q.shape
    rep = H // k.shape[0]
    kf = k.float().repeat_interleave(rep, dim=0)
    vf = v.float().repeat_interleave(rep, dim=0)
    scores = q.float() @ kf.transpose(1, 2) * scale
    visible = torch.arange(k.shape[1])[None, :] <= torch.arange(T)[:, None] + q_offset
    scores = scores.masked_fill(~visible, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vf).to(q.dtype)


def swiglu_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)), weights in nn.Linear layout."""
    xf = x.float()
    h = F.silu(F.linear(xf, w_gate.float())) * F.linear(xf, w_up.float())
    return F.linear(h, w_down.float()).to(x.dtype)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    max_candidates: int = MAX_CANDIDATES,
) -> torch.Tensor:
    """One token id per row.

    - temperature 0: argmax (the first one on ties).
    - otherwise x = logits / temperature, p = softmax(x) over the whole vocabulary, and
      * top_k > 0 keeps tokens with x >= the k-th largest x (k capped at max_candidates);
      * top_p < 1 then keeps, among those and renormalised, the smallest set of highest-probability
        tokens whose mass reaches top_p (ties at the cut kept; never more than max_candidates);
      * inverse-CDF sampling with `uniform`: with either filter on, over the kept tokens from most to
        least likely; with both off, over the whole vocabulary in token-id order. Weights are the
        fp32 exp(x - max x), accumulated in fp64.
    """
    ids = torch.empty(logits.shape[0], dtype=torch.int64)
    for row in range(logits.shape[0]):
        ids[row] = _sample_row(
            logits[row],
            float(temperature[row]),
            int(top_k[row]),
            float(top_p[row]),
            float(uniform[row]),
            max_candidates,
        )
    return ids


def _sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, u: float, cap: int) -> int:
    if temperature == 0.0:
        return int(torch.argmax(logits))
    x = logits.float() / temperature
    weights = torch.exp(x - x.max())
    if top_k <= 0 and top_p >= 1.0:
        return _inverse_cdf(weights, u)
    order = torch.sort(x, descending=True, stable=True).indices
    threshold, total = x.new_tensor(float("-inf")), weights.double().sum()
    if top_k > 0:
        threshold = x[order[min(top_k, cap, x.numel()) - 1]]
        total = weights[x >= threshold].double().sum()
    if top_p < 1.0:
        head = order[: min(cap, x.numel())]
        head = head[x[head] >= threshold]
        w = weights[head].double()
        mass_before = torch.cumsum(w, 0) - w
        n_top_p = int((mass_before < top_p * total).sum().clamp(min=1))
        threshold = torch.maximum(threshold, x[head[n_top_p - 1]])
    kept = order[x[order] >= threshold]
    return int(kept[_inverse_cdf(weights[kept], u)])


def _inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """Index of the first weight whose cumulative sum exceeds u * total (the last on round-off)."""
    cdf = torch.cumsum(weights.double(), 0)
    return min(int((cdf <= u * cdf[-1]).sum()), weights.numel() - 1)
