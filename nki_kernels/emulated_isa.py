"""The nki.isa half of the emulator (see nki_kernels.nki_emulator), plus nki.jit and nki.simulate.

Each function takes the NKI 0.5 signature (explicit dst first), checks the rules stated in the
nki.isa documentation for NeuronCore-v2, and computes the documented result.
"""

from __future__ import annotations

import numpy as np
import torch

from nki_kernels.emulator_core import (
    FLOAT32,
    INTS,
    OPS,
    TORCH_DTYPES,
    EmulatorError,
    Op,
    Tile,
    check,
    start_kernel_run,
)

ON_CHIP = ("sbuf", "psum")


def _on_chip(*tiles) -> None:
    for t in tiles:
        check(isinstance(t, Tile) and t.buffer in ON_CHIP, f"expected an SBUF/PSUM tile, got {t!r}")


def _same_layout(a: Tile, b: Tile, what: str) -> None:
    check(a.shape[0] == b.shape[0] and a.free_size() == b.free_size(), f"{what}: {a.shape} vs {b.shape}")


def _values(t: Tile) -> np.ndarray:
    return t.as_2d()


def _store(dst: Tile, values: np.ndarray) -> None:
    dst.write(np.asarray(values).reshape(dst.shape))


def _operand(operand, parts: int):
    """A scalar, or a [parts, 1] tile broadcast along the free dim."""
    if isinstance(operand, Tile):
        _on_chip(operand)
        check(operand.shape[0] == parts and operand.free_size() == 1, f"vector operand of shape {operand.shape}")
        return _values(operand)
    check(isinstance(operand, int | float) and not isinstance(operand, bool), f"operand {operand!r}")
    return float(operand)


def _apply(op: Op, a, b, reverse: bool = False):
    if not (isinstance(op, Op) and op.alu):  # not check(): the scan calls this per column, and repr is slow
        raise EmulatorError(f"{op!r} is not a Vector Engine ALU operator")
    return op.fn(b, a) if reverse else op.fn(a, b)


def dma_copy(dst, src, **_options) -> None:
    check(isinstance(src, Tile) and isinstance(dst, Tile), "dma_copy between tensors")
    check(src.buffer != "psum" and dst.buffer != "psum", "NKI 0.5: no DMA to or from PSUM (tensor_copy to SBUF)")
    check(src.array.size == dst.array.size, f"dma_copy of {src.shape} into {dst.shape}")
    _store(dst, src.read())


def tensor_copy(dst, src, engine=None, name=None) -> None:
    _on_chip(dst, src)
    _same_layout(dst, src, "tensor_copy")
    _store(dst, _values(src))


def memset(dst, value, engine=None, name=None) -> None:
    _on_chip(dst)
    if dst.dtype.is_float:
        check(isinstance(value, float), f"memset of a float tile with {value!r} (NKI 0.5 wants a float)")
    else:
        check(isinstance(value, int) and not isinstance(value, bool), f"memset of an int tile with {value!r}")
    dst.write(value)


def iota(dst, pattern, offset=0, channel_multiplier=0, name=None) -> None:
    check(dst.buffer == "sbuf", "iota writes SBUF")
    grid = np.zeros([n for _, n in pattern])
    for axis, (step, n) in enumerate(pattern):
        shape = [1] * len(pattern)
        shape[axis] = n
        grid = grid + step * np.arange(n).reshape(shape)
    check(grid.size == dst.free_size(), f"iota pattern of {grid.size} into {dst.shape}")
    _store(dst, offset + channel_multiplier * np.arange(dst.shape[0])[:, None] + grid.reshape(1, -1))


def nc_matmul(dst, stationary, moving, accumulate=None, **_options) -> None:
    check(stationary.buffer == "sbuf" and moving.buffer == "sbuf", "nc_matmul reads SBUF")
    check(dst.buffer == "psum" and dst.dtype == FLOAT32, "nc_matmul writes fp32 PSUM on NeuronCore-v2")
    K, M, N = stationary.shape[0], stationary.free_size(), moving.free_size()
    check(moving.shape[0] == K and K <= 128, f"contraction (partition) dims {K} and {moving.shape[0]}")
    check(M <= 128 and N <= 512, f"stationary free {M} (max 128) / moving free {N} (max 512)")
    check((stationary.dtype == FLOAT32) == (moving.dtype == FLOAT32), "fp32 operands go together")
    check(dst.shape[0] == M and dst.free_size() == N, f"dst {dst.shape} for a [{M}, {N}] product")
    product = _values(stationary).astype(np.float32).T @ _values(moving).astype(np.float32)
    written = dst.written.reshape(M, N)
    add = written if accumulate is None else np.full((M, N), bool(accumulate))
    _store(dst, np.where(add, _values(dst) + product, product))
    dst.written[...] = True


def nc_transpose(dst, data, engine=None, name=None) -> None:
    P, F = data.shape[0], data.free_size()
    check(P <= 128 and F <= 128, f"Tensor Engine transpose of {data.shape} (max [128, 128])")
    check(data.buffer == "sbuf" and dst.buffer == "psum", "Tensor Engine transpose: SBUF -> PSUM")
    check(dst.dtype == data.dtype, "nc_transpose keeps the dtype")
    check(dst.shape[0] == F and dst.free_size() == P, f"transpose of {data.shape} into {dst.shape}")
    _store(dst, _values(data).T)


def tensor_tensor(dst, data1, data2, op, engine=None, name=None) -> None:
    _on_chip(dst, data1, data2)
    check(not (data1.buffer == data2.buffer == "psum"), "tensor_tensor: at most one input in PSUM")
    _same_layout(data1, data2, "tensor_tensor inputs")
    _same_layout(dst, data1, "tensor_tensor output")
    _store(dst, _apply(op, _values(data1), _values(data2)))


def tensor_scalar(
    dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False, engine=None, name=None
) -> None:
    _on_chip(dst, data)
    _same_layout(dst, data, "tensor_scalar")
    out = _apply(op0, _values(data), _operand(operand0, data.shape[0]), reverse0)
    if op1 is not None:
        out = _apply(op1, out, _operand(operand1, data.shape[0]), reverse1)
    _store(dst, out)


def scalar_tensor_tensor(dst, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False, name=None) -> None:
    _on_chip(dst, data, operand1)
    check(not (data.buffer == operand1.buffer == "psum"), "scalar_tensor_tensor: at most one input in PSUM")
    _same_layout(dst, data, "scalar_tensor_tensor")
    _same_layout(operand1, data, "scalar_tensor_tensor operand1")
    out = _apply(op0, _values(data), _operand(operand0, data.shape[0]), reverse0)
    _store(dst, _apply(op1, out, _values(operand1), reverse1))


def tensor_reduce(dst, op, data, axis, negate=False, keepdims=False, name=None) -> None:
    _on_chip(dst, data)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    ndim = data.array.ndim
    check(0 not in axes and sorted(axes) == list(range(min(axes), ndim)), f"reduce over last free dims, not {axes}")
    check(op in (OPS["add"], OPS["maximum"], OPS["minimum"], OPS["multiply"]), f"reduction {op!r}")
    values = data.read()
    for ax in sorted(axes, reverse=True):
        values = op.fn.reduce(values, axis=ax)
    check(values.size == dst.array.size, f"reduction result {values.shape} into {dst.shape}")
    _store(dst, -values if negate else values)


def _activate(op: Op, data: Tile, bias, scale) -> np.ndarray:
    check(isinstance(op, Op) and op.activation, f"{op!r} is not a Scalar Engine activation")
    check(bias is None or isinstance(bias, Tile), "NeuronCore-v2: activation bias must be a [P, 1] vector")
    parts = data.shape[0]
    x = _values(data) * _operand(scale, parts) + (0.0 if bias is None else _operand(bias, parts))
    with np.errstate(over="ignore"):
        return op.fn(x)


def activation(
    dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, reduce_cmd=None, name=None
) -> None:
    _on_chip(dst, data)
    _same_layout(dst, data, "activation")
    check(reduce_op is None and reduce_res is None, "the kernels reduce through activation_reduce")
    _store(dst, _activate(op, data, bias, scale))


def activation_reduce(dst, op, data, reduce_op, reduce_res, bias=None, scale=1.0, name=None) -> None:
    _on_chip(dst, data, reduce_res)
    _same_layout(dst, data, "activation_reduce")
    check(reduce_op == OPS["add"], "NeuronCore-v2: activation_reduce adds")
    check(reduce_res.shape[0] == data.shape[0] and reduce_res.free_size() == 1, "reduce_res is [P, 1]")
    out = _activate(op, data, bias, scale)
    _store(dst, out)
    _store(reduce_res, out.sum(axis=1, keepdims=True))


def reciprocal(dst, data, name=None) -> None:
    _on_chip(dst, data)
    _same_layout(dst, data, "reciprocal")
    _store(dst, 1.0 / _values(data))


def tensor_copy_predicated(dst, src, predicate, reverse_pred=False, name=None) -> None:
    _on_chip(dst, predicate)
    check(not predicate.dtype.is_float, "tensor_copy_predicated: the predicate is an integer tile")
    _same_layout(dst, predicate, "tensor_copy_predicated")
    source = _values(src) if isinstance(src, Tile) else float(src)
    mask = (_values(predicate) != 0) != reverse_pred
    _store(dst, np.where(mask, source, _values(dst)))


def tensor_scalar_reduce(
    dst, data, op0, operand0, reduce_op, reduce_res, reverse0=False, reduce_cmd=None, reduce_init=None, name=None
) -> None:
    _on_chip(dst, data, reduce_res)
    _same_layout(dst, data, "tensor_scalar_reduce")
    out = _apply(op0, _values(data), _operand(operand0, data.shape[0]), reverse0)
    _store(dst, out)
    _store(reduce_res, reduce_op.fn.reduce(out, axis=1)[:, None])


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None) -> None:
    _on_chip(dst, data0, data1)
    _same_layout(data0, data1, "tensor_tensor_scan")
    a, b = _values(data0).astype(np.float32), _values(data1).astype(np.float32)
    state = np.broadcast_to(np.float32(_operand(initial, a.shape[0])), (a.shape[0], 1))[:, 0].astype(np.float32)
    out = np.empty_like(a)
    for i in range(a.shape[1]):  # fp32 running state, as the Vector Engine keeps it
        state = _apply(op1, _apply(op0, a[:, i], state, reverse0), b[:, i], reverse1).astype(np.float32)
        out[:, i] = state
    _store(dst, out)


def max8(dst, src, name=None) -> None:
    _on_chip(dst, src)
    check(8 <= src.free_size() <= 16384, f"max8 reads 8..16384 elements per partition, not {src.free_size()}")
    check(dst.shape == (src.shape[0], 8), f"max8 writes [P, 8], not {dst.shape}")
    values = _values(src)
    top = np.partition(values, values.shape[1] - 8, axis=1)[:, -8:]
    _store(dst, -np.sort(-top, axis=1))


def _first_matches(values: np.ndarray, targets: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """Per partition, the first not-yet-taken index of each target value (marking it taken)."""
    index = np.zeros(targets.shape, dtype=np.int64)
    parts = np.arange(targets.shape[0])
    for j in range(targets.shape[1]):
        hits = (values == targets[:, j : j + 1]) & ~taken
        missing = np.flatnonzero(~hits.any(axis=1))
        check(missing.size == 0, f"value {j} of the 8 not found in partitions {missing.tolist()}")
        index[:, j] = hits.argmax(axis=1)
        taken[parts, index[:, j]] = True
    return index


def nc_find_index8(dst, data, vals, name=None) -> None:
    _on_chip(dst, data, vals)
    check(not dst.dtype.is_float and vals.free_size() == 8, "nc_find_index8 writes 8 integer indices")
    values = _values(data)
    index = np.zeros((values.shape[0], 8), dtype=np.int64)
    for j in range(8):  # each value's first occurrence, independently
        index[:, j] = _first_matches(values, _values(vals)[:, j : j + 1], np.zeros(values.shape, bool))[:, 0]
    _store(dst, index)


def nc_match_replace8(dst, data, vals, imm, dst_idx=None, name=None) -> None:
    _on_chip(dst, data, vals)
    values = _values(data).copy()
    taken = np.zeros(values.shape, dtype=bool)
    index = _first_matches(values, _values(vals), taken)
    values[taken] = imm
    _store(dst, values)
    if dst_idx is not None:
        _store(dst_idx, index)


def nc_n_gather(dst, data, indices, name=None) -> None:
    _on_chip(dst, data, indices)
    check(indices.dtype == INTS["uint32"], "nc_n_gather indices are uint32")
    index = _values(indices).astype(np.int64)
    check(bool(np.all((index >= 0) & (index < data.free_size()))), "nc_n_gather index out of range")
    _store(dst, np.take_along_axis(_values(data), index, axis=1))


def jit(fn=None, **_options):
    return fn if fn is not None else (lambda f: f)


def _to_tile(value):
    if not isinstance(value, torch.Tensor):
        return value
    dtype = TORCH_DTYPES[value.dtype]
    array = value.float().numpy().copy() if dtype.is_float else value.to(torch.int64).numpy().copy()
    return Tile(array, dtype, "hbm")


def _to_torch(tile: Tile) -> torch.Tensor:
    if tile.dtype.is_float:
        torch_dtype = torch.float32 if tile.dtype == FLOAT32 else torch.bfloat16
        return torch.from_numpy(tile.array.astype(np.float32)).to(torch_dtype)
    return torch.from_numpy(tile.array.astype(np.int64))


def simulate(kernel):
    """Like nki.simulate: run the kernel on torch tensors (HBM), return torch tensors. Each run
    starts the SBUF/PSUM accounting afresh (see nki_emulator.peak_bytes)."""

    def run(*args):
        start_kernel_run()
        out = kernel(*[_to_tile(a) for a in args])
        return tuple(_to_torch(t) for t in out) if isinstance(out, tuple) else _to_torch(out)

    return run


FUNCTIONS = {
    name: globals()[name]
    for name in (
        "dma_copy",
        "tensor_copy",
        "memset",
        "iota",
        "nc_matmul",
        "nc_transpose",
        "tensor_tensor",
        "tensor_scalar",
        "scalar_tensor_tensor",
        "tensor_reduce",
        "activation",
        "activation_reduce",
        "reciprocal",
        "tensor_copy_predicated",
        "tensor_scalar_reduce",
        "tensor_tensor_scan",
        "max8",
        "nc_find_index8",
        "nc_match_replace8",
        "nc_n_gather",
    )
}
