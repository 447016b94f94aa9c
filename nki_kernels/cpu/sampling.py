"""Token sampling over the vocabulary in tiles, on the CPU: greedy, temperature, top-k, top-p.

The NKI kernel keeps a batch of rows on the partitions and walks the vocabulary in tiles:
  pass 1, per tile: max and first argmax, and the tile's top `max_candidates` (max8 rounds), merged
          into the row's global max and its sorted top candidates;
  from the candidates: the top-k threshold, the top-p threshold, and the inverse-CDF draw over the
          kept candidates (most likely first);
  pass 2, per tile (only needed when both filters are off): exp(x - max) and its running sum, so
          that the draw over the whole vocabulary (in token-id order) needs no sort.
This is that algorithm in torch ops; see reference.sample for the semantics. Weights are fp32 as on
the chip, their running sums fp64 here (the chip's are fp32).
"""

from __future__ import annotations

import torch

from nki_kernels.tiles import MAX_CANDIDATES, SAMPLE_TILE, ranges


def _tile_pass(x: torch.Tensor, tile: int, cap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row max, first argmax, and the top min(cap, V) candidates (values desc, ids) over all tiles."""
    maxes, argmaxes, values, ids = [], [], [], []
    for start, size in ranges(x.shape[1], tile):
        xt = x[:, start : start + size]
        tile_max, tile_arg = xt.max(dim=-1)  # first occurrence on ties
        maxes.append(tile_max)
        argmaxes.append(tile_arg + start)
        top = torch.topk(xt, min(cap, size), dim=-1)
        values.append(top.values)
        ids.append(top.indices + start)
    row_max, best_tile = torch.stack(maxes, dim=-1).max(dim=-1)  # the first tile holding the max
    argmax = torch.stack(argmaxes, dim=-1).gather(1, best_tile[:, None])[:, 0]
    merged = torch.topk(torch.cat(values, dim=-1), min(cap, x.shape[1]), dim=-1)
    return row_max, argmax, merged.values, torch.cat(ids, dim=-1).gather(1, merged.indices)


def _draw(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """How many cdf entries are <= target: the index of the first one that exceeds it."""
    return (cdf <= target[:, None]).sum(dim=-1)


def _draw_vocabulary(
    x: torch.Tensor, row_max: torch.Tensor, uniform: torch.Tensor, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse CDF over the whole vocabulary in id order, and the row's total weight: per tile a
    running sum on top of the previous tiles' total, so the draw is a count summed over tiles."""
    prefix = x.new_zeros(x.shape[0], dtype=torch.float64)
    cdfs = []
    for start, size in ranges(x.shape[1], tile):
        weights = torch.exp(x[:, start : start + size] - row_max[:, None])
        cdfs.append(torch.cumsum(weights.double(), dim=-1) + prefix[:, None])
        prefix = cdfs[-1][:, -1]
    target = uniform.double() * prefix
    count = sum(_draw(cdf, target) for cdf in cdfs)
    return count.clamp(max=x.shape[1] - 1), prefix


def _thresholds(
    values: torch.Tensor, weights: torch.Tensor, total: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """The lowest kept x per row from the sorted candidates: max(top-k cut, top-p cut); -inf if off."""
    off = values.new_full((values.shape[0],), float("-inf"))
    k_on = top_k > 0
    k_index = top_k.clamp(min=1, max=values.shape[1]) - 1
    cut_k = torch.where(k_on, values.gather(1, k_index[:, None])[:, 0], off)
    in_k = values >= cut_k[:, None]
    kept = weights.double() * in_k
    # top-p renormalises over the top-k survivors (Hugging Face applies top-k first).
    norm = torch.where(k_on, kept.sum(dim=-1), total)
    mass_before = torch.cumsum(kept, dim=-1) - kept
    n_p = ((mass_before < top_p.double()[:, None] * norm[:, None]) & in_k).sum(dim=-1).clamp(min=1)
    cut_p = torch.where(top_p < 1.0, values.gather(1, n_p[:, None] - 1)[:, 0], off)
    return torch.maximum(cut_k, cut_p)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    tile: int = SAMPLE_TILE,
    max_candidates: int = MAX_CANDIDATES,
) -> torch.Tensor:
    """logits [S, V]; temperature [S] (0 = greedy); top_k [S] int64 (0 = off, capped at
    max_candidates); top_p [S] (1.0 = off); uniform [S] in [0, 1) -> token ids [S] int64."""
    greedy = temperature <= 0
    x = logits.float() / torch.where(greedy, 1.0, temperature.float())[:, None]
    row_max, argmax, values, ids = _tile_pass(x, tile, max_candidates)
    full_draw, total = _draw_vocabulary(x, row_max, uniform, tile)
    weights = torch.exp(values - row_max[:, None])
    cut = _thresholds(values, weights, total, top_k, top_p)
    allowed = values >= cut[:, None]
    cdf = torch.cumsum(weights.double() * allowed, dim=-1)
    position = torch.minimum(_draw(cdf, uniform.double() * cdf[:, -1]), allowed.sum(dim=-1) - 1)
    candidate_draw = ids.gather(1, position[:, None])[:, 0]
    filtered = (top_k > 0) | (top_p < 1.0)
    return torch.where(greedy, argmax, torch.where(filtered, candidate_draw, full_draw))
