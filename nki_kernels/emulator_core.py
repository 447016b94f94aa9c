"""What both halves of the NKI emulator share: the rule check, the dtypes, tiles and the operators.

nki_kernels.nki_emulator (nki.language and installing the emulator as `nki`) and
nki_kernels.emulated_isa (nki.isa) both build on this module, which imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class EmulatorError(AssertionError):
    """The kernel broke a rule the hardware or the NKI 0.3 language imposes."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise EmulatorError(message)


@dataclass(frozen=True)
class DType:
    name: str
    bits: int
    is_float: bool


FLOAT32, BFLOAT16 = DType("float32", 32, True), DType("bfloat16", 16, True)
INTS = {
    name: DType(name, bits, False)
    for name, bits in (("uint8", 8), ("uint16", 16), ("uint32", 32), ("int8", 8), ("int16", 16), ("int32", 32))
}
TORCH_DTYPES = {
    torch.float32: FLOAT32,
    torch.bfloat16: BFLOAT16,
    torch.int32: INTS["int32"],
    torch.uint32: INTS["uint32"],
    torch.uint8: INTS["uint8"],
}


def _round_bf16(a: np.ndarray) -> np.ndarray:
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(a), rounded, a).astype(np.float32)


def _as_dtype(values, dtype: DType) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if dtype == BFLOAT16:
        return _round_bf16(values.astype(np.float32))
    if dtype.is_float:
        return values.astype(np.float32)
    check(bool(np.all(np.isfinite(values))), f"non-finite value stored into an {dtype.name} tile")
    low = -(2 ** (dtype.bits - 1)) if dtype.name.startswith("int") else 0
    high = 2 ** (dtype.bits - (1 if dtype.name.startswith("int") else 0)) - 1
    return np.clip(np.rint(values), low, high).astype(np.int64)


class Tile:
    """A tensor in HBM, SBUF or PSUM; indexing gives a view, once (no slices of slices)."""

    def __init__(self, array: np.ndarray, dtype: DType, buffer: str, is_view: bool = False, written=None):
        self.array, self.dtype, self.buffer, self.is_view = array, dtype, buffer, is_view
        self.written = written  # PSUM only: which elements an nc_matmul wrote (for auto-accumulate)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __getitem__(self, index) -> Tile:
        check(not self.is_view, "slice of a slice: NKI 0.3 has no nested slicing")
        index = index if isinstance(index, tuple) else (index,)
        check(all(isinstance(i, int | slice) for i in index), f"unsupported index {index!r}")
        written = None if self.written is None else self.written[index]
        return Tile(self.array[index], self.dtype, self.buffer, True, written)

    def broadcast(self, dim: int, size: int) -> Tile:
        check(self.shape[dim] == 1, f"broadcast of dim {dim} of size {self.shape[dim]}")
        shape = list(self.shape)
        shape[dim] = size
        return Tile(np.broadcast_to(self.array, shape), self.dtype, self.buffer, True)

    def reshape(self, shape) -> Tile:
        return Tile(self.array.reshape(shape), self.dtype, self.buffer, self.is_view)

    def read(self) -> np.ndarray:
        return self.array.astype(np.float64)

    def write(self, values) -> None:
        self.array[...] = _as_dtype(np.broadcast_to(values, self.shape), self.dtype)

    def free_size(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))

    def as_2d(self) -> np.ndarray:
        return self.read().reshape(self.shape[0], -1)


@dataclass(frozen=True)
class Op:
    """An nki.language operator: which engines take it (Vector Engine ALU, Scalar Engine activation)."""

    name: str
    fn: object
    alu: bool
    activation: bool


def _cmp(f):
    return lambda a, b: f(a, b).astype(np.float64)


OPS = {
    "add": Op("add", np.add, True, False),
    "subtract": Op("subtract", np.subtract, True, False),
    "multiply": Op("multiply", np.multiply, True, False),
    "maximum": Op("maximum", np.maximum, True, False),
    "minimum": Op("minimum", np.minimum, True, False),
    "equal": Op("equal", _cmp(np.equal), True, False),
    "greater": Op("greater", _cmp(np.greater), True, False),
    "greater_equal": Op("greater_equal", _cmp(np.greater_equal), True, False),
    "less": Op("less", _cmp(np.less), True, False),
    "less_equal": Op("less_equal", _cmp(np.less_equal), True, False),
    "exp": Op("exp", np.exp, False, True),
    "square": Op("square", np.square, False, True),
    "copy": Op("copy", lambda a: a, False, True),
    "silu": Op("silu", lambda a: a / (1.0 + np.exp(-a)), False, True),
    "rsqrt": Op("rsqrt", lambda a: 1.0 / np.sqrt(a), True, True),
}
