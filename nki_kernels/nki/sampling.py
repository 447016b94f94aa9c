"""NKI: greedy / temperature / top-k / top-p sampling over the vocabulary in tiles.

Rows (slots, <= 128) are the partitions; the vocabulary goes by in tiles of `tile` entries (max8
reads at most 16384 per partition). Three passes over the logits in HBM:
  1. per tile: the top `max_candidates` values and positions (max8 + match_replace8 rounds), the
     tile max and its first index; merged into the row max, first argmax and sorted top candidates;
  2. per tile: sum of exp(x - max), the row's total weight;
  3. per tile: a running sum (tensor_tensor_scan seeded with the previous tiles' total) and how many
     entries stay <= u * total: the inverse-CDF draw over the whole vocabulary in id order.
top-k / top-p cuts and the draw over the kept candidates use only the [rows, max_candidates]
candidates. Same algorithm as cpu/sampling.py, with fp32 running sums (the CPU's are fp64).
Inputs are [S, 1] fp32 columns prepared by the host: 1/temperature (1 for greedy rows), greedy
(1.0 / 0.0), top_k, top_p, uniform. Every tile must hold at least max_candidates entries.

SBUF: one fp32 logits tile is on chip at a time (64 KiB per partition at the default 16384 entries,
a third of a 192 KiB partition) and every pass works on it in place; a helper per tile frees it
before the next tile's is allocated. Besides it: the candidates, 2 x tiles x max_candidates fp32
(16 KiB at vocab 128256 and the defaults), and [S, max_candidates] work tiles.
"""

from __future__ import annotations

import nki
import nki.isa as nisa
import nki.language as nl

from nki_kernels.nki.common import load, sbuf
from nki_kernels.tiles import NEG, PMAX, ranges


def _scaled_tile(logits, inv_t, v0: int, vn: int, S: int):
    x = sbuf((S, vn), nl.float32)
    nisa.dma_copy(dst=x, src=logits[0:S, v0 : v0 + vn])
    nisa.tensor_scalar(dst=x, data=x, op0=nl.multiply, operand0=inv_t)
    return x


def _top8_rounds(work, values, col: int, positions, S: int, count: int) -> None:
    """values[:, col:col+count] = the count largest of work, descending; positions = where they were.
    Each round takes 8 (max8) and knocks them out of work (match_replace8 writes NEG over them)."""
    for r in nl.sequential_range(count // 8):
        lo, hi = col + r * 8, col + (r + 1) * 8
        nisa.max8(dst=values[0:S, lo:hi], src=work)
        nisa.nc_match_replace8(
            dst=work, data=work, vals=values[0:S, lo:hi], imm=NEG, dst_idx=positions[0:S, r * 8 : (r + 1) * 8]
        )


def _column_op(data, op, operand, S: int, dtype=nl.float32):
    out = sbuf((S, 1), dtype)
    nisa.tensor_scalar(dst=out, data=data, op0=op, operand0=operand)
    return out


def _row_sum(data, S: int):
    out = sbuf((S, 1), nl.float32)
    nisa.tensor_reduce(dst=out, op=nl.add, data=data, axis=1, keepdims=True)
    return out


def _select(flag_u8, if_true, if_false, S: int):
    """Per row: if_true where flag, else if_false (a predicated copy, exact unlike a*f + b*(1-f))."""
    out = sbuf((S, 1), nl.float32)
    nisa.tensor_copy(dst=out, src=if_false)
    nisa.tensor_copy_predicated(dst=out, src=if_true, predicate=flag_u8)
    return out


def _pick(row, index, iota, S: int, width: int):
    """row[index] per row, as sum(row * (iota == index))."""
    onehot = sbuf((S, width), nl.float32)
    nisa.tensor_scalar(dst=onehot, data=iota, op0=nl.equal, operand0=index)
    nisa.tensor_tensor(dst=onehot, data1=onehot, data2=row, op=nl.multiply)
    return _row_sum(onehot, S)


def _cumsum(dst, data, initial) -> None:
    """Running sum of data (weights >= 0) along the free dim, seeded with initial (>= 0).

    The scan computes max(data[i] + result[i-1], data[i]), which is exactly data[i] + result[i-1]
    for non-negative terms; the usual 1 * result[i-1] + data[i] would need a tile of ones as wide
    as a vocabulary tile (another 64 KiB per partition)."""
    nisa.tensor_tensor_scan(dst=dst, data0=data, data1=data, initial=initial, op0=nl.add, op1=nl.maximum)


def _tile_candidates(logits, inv_t, t: int, v0: int, vn: int, found, S: int, C: int) -> None:
    """Tile t (entries v0..v0+vn): its max and first argmax into column t of found's tile_max and
    tile_arg, its top C values and their ids into columns t*C.. of cand_values and cand_ids."""
    tile_max, tile_arg, cand_values, cand_ids = found
    x = _scaled_tile(logits, inv_t, v0, vn, S)
    # The first argmax is found before the rounds overwrite x: one max8 more, one tile copy less.
    top, first = sbuf((S, 8), nl.float32), sbuf((S, 8), nl.uint32)
    nisa.max8(dst=top, src=x)
    nisa.nc_find_index8(dst=first, data=x, vals=top)
    nisa.tensor_copy(dst=tile_max[0:S, t : t + 1], src=top[0:S, 0:1])
    nisa.tensor_scalar(dst=tile_arg[0:S, t : t + 1], data=first[0:S, 0:1], op0=nl.add, operand0=float(v0))
    positions = sbuf((S, C), nl.uint32)
    _top8_rounds(x, cand_values, t * C, positions, S, C)
    nisa.tensor_scalar(dst=cand_ids[0:S, t * C : (t + 1) * C], data=positions, op0=nl.add, operand0=float(v0))


def _pass_candidates(logits, inv_t, tiles, S: int, C: int):
    """Pass 1: row max, first argmax (as fp32 ids), sorted top-C values and their ids."""
    nt = len(tiles)
    tile_max, tile_arg = sbuf((S, nt), nl.float32), sbuf((S, nt), nl.float32)
    cand_values, cand_ids = sbuf((S, nt * C), nl.float32), sbuf((S, nt * C), nl.float32)
    for t in range(nt):
        v0, vn = tiles[t]
        _tile_candidates(logits, inv_t, t, v0, vn, (tile_max, tile_arg, cand_values, cand_ids), S, C)
    best, arg = sbuf((S, 1), nl.float32), sbuf((S, 1), nl.float32)
    nisa.tensor_copy(dst=best, src=tile_max[0:S, 0:1])
    nisa.tensor_copy(dst=arg, src=tile_arg[0:S, 0:1])
    for t in range(1, nt):  # a later tile wins only with a strictly larger max: the first argmax
        better = _column_op(tile_max[0:S, t : t + 1], nl.greater, best, S, nl.uint8)
        nisa.tensor_copy_predicated(dst=arg, src=tile_arg[0:S, t : t + 1], predicate=better)
        nisa.tensor_tensor(dst=best, data1=best, data2=tile_max[0:S, t : t + 1], op=nl.maximum)
    values, positions = sbuf((S, C), nl.float32), sbuf((S, C), nl.uint32)
    _top8_rounds(cand_values, values, 0, positions, S, C)
    ids = sbuf((S, C), nl.float32)
    nisa.nc_n_gather(dst=ids, data=cand_ids, indices=positions)
    return best, arg, values, ids


def _tile_weight(logits, inv_t, neg_max, v0: int, vn: int, weight, S: int) -> None:
    """weight [S, 1] = sum over entries v0..v0+vn of exp(x - max)."""
    x = _scaled_tile(logits, inv_t, v0, vn, S)
    nisa.activation_reduce(dst=x, op=nl.exp, data=x, reduce_op=nl.add, reduce_res=weight, bias=neg_max, scale=1.0)


def _pass_total(logits, inv_t, neg_max, tiles, S: int):
    """Pass 2: sum over the vocabulary of exp(x - max)."""
    parts = sbuf((S, len(tiles)), nl.float32)
    for t in range(len(tiles)):
        v0, vn = tiles[t]
        _tile_weight(logits, inv_t, neg_max, v0, vn, parts[0:S, t : t + 1], S)
    return _row_sum(parts, S)


def _tile_draw(logits, inv_t, neg_max, v0: int, vn: int, target, prefix, count, S: int) -> None:
    """Adds to count the entries v0..v0+vn whose running weight (on top of prefix, the earlier
    tiles' total) stays <= target, and moves prefix on to this tile's end."""
    x = _scaled_tile(logits, inv_t, v0, vn, S)
    nisa.activation(dst=x, op=nl.exp, data=x, bias=neg_max, scale=1.0)
    _cumsum(x, x, prefix)
    nisa.tensor_copy(dst=prefix, src=x[0:S, vn - 1 : vn])
    tile_count = sbuf((S, 1), nl.float32)
    nisa.tensor_scalar_reduce(
        dst=x, data=x, op0=nl.less_equal, operand0=target, reduce_op=nl.add, reduce_res=tile_count
    )
    nisa.tensor_tensor(dst=count, data1=count, data2=tile_count, op=nl.add)


def _pass_draw(logits, inv_t, neg_max, tiles, target, S: int, V: int):
    """Pass 3: index of the first vocabulary entry whose running weight exceeds target."""
    prefix, count = sbuf((S, 1), nl.float32), sbuf((S, 1), nl.float32)
    nisa.memset(dst=prefix, value=0.0)
    nisa.memset(dst=count, value=0.0)
    for v0, vn in tiles:
        _tile_draw(logits, inv_t, neg_max, v0, vn, target, prefix, count, S)
    return _column_op(count, nl.minimum, float(V - 1), S)


def _cuts(values, weights, total, top_k, top_p, iota, S: int, C: int):
    """The lowest kept value per row: max(top-k cut, top-p cut), NEG where a filter is off."""
    never = sbuf((S, 1), nl.float32)
    nisa.memset(dst=never, value=NEG)
    k_index = sbuf((S, 1), nl.float32)  # clamp(top_k, 1, C) - 1
    nisa.tensor_scalar(dst=k_index, data=top_k, op0=nl.maximum, operand0=1.0, op1=nl.minimum, operand1=float(C))
    nisa.tensor_scalar(dst=k_index, data=k_index, op0=nl.subtract, operand0=1.0)
    k_on = _column_op(top_k, nl.greater, 0.0, S, nl.uint8)
    cut_k = _select(k_on, _pick(values, k_index, iota, S, C), never, S)
    in_k = sbuf((S, C), nl.float32)
    nisa.tensor_scalar(dst=in_k, data=values, op0=nl.greater_equal, operand0=cut_k)
    kept = sbuf((S, C), nl.float32)
    nisa.tensor_tensor(dst=kept, data1=weights, data2=in_k, op=nl.multiply)
    norm = _select(k_on, _row_sum(kept, S), total, S)  # top-p renormalises over the top-k survivors
    mass_before = sbuf((S, C), nl.float32)
    _cumsum(mass_before, kept, 0.0)
    nisa.tensor_tensor(dst=mass_before, data1=mass_before, data2=kept, op=nl.subtract)
    limit = sbuf((S, 1), nl.float32)
    nisa.tensor_tensor(dst=limit, data1=top_p, data2=norm, op=nl.multiply)
    inside = sbuf((S, C), nl.float32)
    nisa.tensor_scalar(dst=inside, data=mass_before, op0=nl.less, operand0=limit)
    nisa.tensor_tensor(dst=inside, data1=inside, data2=in_k, op=nl.multiply)
    p_index = _column_op(_row_sum(inside, S), nl.maximum, 1.0, S)
    nisa.tensor_scalar(dst=p_index, data=p_index, op0=nl.subtract, operand0=1.0)
    p_on = _column_op(top_p, nl.less, 1.0, S, nl.uint8)
    cut_p = _select(p_on, _pick(values, p_index, iota, S, C), never, S)
    nisa.tensor_tensor(dst=cut_p, data1=cut_p, data2=cut_k, op=nl.maximum)
    return cut_p, k_on, p_on


def _candidate_draw(values, weights, ids, cut, uniform, iota, S: int, C: int):
    """Inverse CDF over the kept candidates, most likely first."""
    allowed = sbuf((S, C), nl.float32)
    nisa.tensor_scalar(dst=allowed, data=values, op0=nl.greater_equal, operand0=cut)
    kept = sbuf((S, C), nl.float32)
    nisa.tensor_tensor(dst=kept, data1=weights, data2=allowed, op=nl.multiply)
    cdf = sbuf((S, C), nl.float32)
    _cumsum(cdf, kept, 0.0)
    target = sbuf((S, 1), nl.float32)
    nisa.tensor_tensor(dst=target, data1=uniform, data2=cdf[0:S, C - 1 : C], op=nl.multiply)
    below, position = sbuf((S, C), nl.float32), sbuf((S, 1), nl.float32)
    nisa.tensor_scalar_reduce(
        dst=below, data=cdf, op0=nl.less_equal, operand0=target, reduce_op=nl.add, reduce_res=position
    )
    last = _column_op(_row_sum(allowed, S), nl.subtract, 1.0, S)
    nisa.tensor_tensor(dst=position, data1=position, data2=last, op=nl.minimum)
    return _pick(ids, position, iota, S, C)


@nki.jit
def sample_kernel(logits, inv_temperature, greedy, top_k, top_p, uniform, tile: int, max_candidates: int):
    """logits [S, V]; the other inputs fp32 [S, 1] -> token ids int32 [S, 1]."""
    S, V = logits.shape
    C = max_candidates
    tiles = ranges(V, tile)
    assert S <= PMAX and C % 8 == 0 and tiles[-1][1] >= C  # the last tile is the shortest
    inv_t = load(inv_temperature, (S, 1), nl.float32)
    greedy_f = load(greedy, (S, 1), nl.float32)
    top_k_f = load(top_k, (S, 1), nl.float32)
    top_p_f = load(top_p, (S, 1), nl.float32)
    u = load(uniform, (S, 1), nl.float32)
    iota = sbuf((S, C), nl.float32)
    nisa.iota(dst=iota, pattern=[[1, C]], offset=0, channel_multiplier=0)

    row_max, argmax, values, ids = _pass_candidates(logits, inv_t, tiles, S, C)
    neg_max = _column_op(row_max, nl.multiply, -1.0, S)
    weights = sbuf((S, C), nl.float32)
    nisa.activation(dst=weights, op=nl.exp, data=values, bias=neg_max, scale=1.0)
    total = _pass_total(logits, inv_t, neg_max, tiles, S)
    cut, k_on, p_on = _cuts(values, weights, total, top_k_f, top_p_f, iota, S, C)
    from_candidates = _candidate_draw(values, weights, ids, cut, u, iota, S, C)
    target = sbuf((S, 1), nl.float32)
    nisa.tensor_tensor(dst=target, data1=u, data2=total, op=nl.multiply)
    from_vocab = _pass_draw(logits, inv_t, neg_max, tiles, target, S, V)

    filtered = sbuf((S, 1), nl.uint8)
    nisa.tensor_tensor(dst=filtered, data1=k_on, data2=p_on, op=nl.maximum)
    choice = _select(filtered, from_candidates, from_vocab, S)
    is_greedy = _column_op(greedy_f, nl.greater, 0.5, S, nl.uint8)
    choice = _select(is_greedy, argmax, choice, S)
    result = sbuf((S, 1), nl.int32)
    nisa.tensor_copy(dst=result, src=choice)
    out = nl.ndarray((S, 1), dtype=nl.int32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=result)
    return out
