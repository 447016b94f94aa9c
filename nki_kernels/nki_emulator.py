"""A numpy model of the NKI 0.3 instructions that the kernels in nki_kernels.nki use.

Where the real `nki` package is absent, the tests install this as `nki`, `nki.isa` and
`nki.language` (see `installed()`) and run the kernels through it. It
  - checks NeuronCore-v2 limits: <= 128 partitions, nc_matmul stationary [K<=128, M<=128], moving
    [K, N<=512], dst one fp32 PSUM bank; operands in the right memories; no DMA from PSUM;
    activation bias a [P, 1] vector (v2 has no scalar bias); memset values of the tile's type;
  - rejects slices of slices (NKI 0.3 has none) and fills new tiles with NaN, so that a read of
    memory nobody wrote shows up in the results;
  - computes each instruction's documented semantics in fp32 and stores at the destination's dtype
    (bf16 rounded to nearest even).
It is not AWS's simulator: it says nothing about whether the NKI compiler accepts the code or how
fast it runs, only whether the algorithm, indexing and tile shapes are right.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
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

    def ap(self, pattern, vector_offset=None, indirect_dim: int = 0, offset: int = 0) -> AccessPattern:
        return AccessPattern(self, pattern, vector_offset, indirect_dim, offset)

    def read(self) -> np.ndarray:
        return self.array.astype(np.float64)

    def write(self, values) -> None:
        self.array[...] = _as_dtype(np.broadcast_to(values, self.shape), self.dtype)

    def free_size(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64))

    def as_2d(self) -> np.ndarray:
        return self.read().reshape(self.shape[0], -1)


@dataclass
class AccessPattern:
    tile: Tile
    pattern: list
    vector_offset: Tile | None
    indirect_dim: int
    offset: int


# --- nki.language -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
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


def _ndarray(shape, dtype: DType, buffer: str = "sbuf", name: str = "", address=None) -> Tile:
    shape = tuple(int(s) for s in shape)
    if buffer in ("sbuf", "psum"):
        check(shape[0] <= 128, f"{buffer} tile with {shape[0]} partitions (max 128)")
        per_partition = int(np.prod(shape[1:], dtype=np.int64)) * dtype.bits // 8
        limit = 2048 if buffer == "psum" else 192 * 1024
        check(per_partition <= limit, f"{buffer} tile of {per_partition} bytes per partition (max {limit})")
    fill = np.nan if dtype.is_float else -(2**40)  # garbage that cannot pass for data
    array = np.full(shape, fill, dtype=np.float32 if dtype.is_float else np.int64)
    written = np.zeros(shape, dtype=bool) if buffer == "psum" else None
    return Tile(array, dtype, buffer, False, written)


def _range(start, stop=None, step=1):
    return range(start, stop, step) if stop is not None else range(start)


def _language_module() -> types.ModuleType:
    nl = types.ModuleType("nki.language")
    nl.float32, nl.bfloat16 = FLOAT32, BFLOAT16
    for name, dtype in INTS.items():
        setattr(nl, name, dtype)
    for name, op in OPS.items():
        setattr(nl, name, op)
    nl.sbuf, nl.psum, nl.hbm, nl.shared_hbm, nl.private_hbm = "sbuf", "psum", "hbm", "shared_hbm", "hbm"
    nl.ndarray = _ndarray
    nl.affine_range = nl.sequential_range = nl.static_range = _range
    nl.tile_size = types.SimpleNamespace(pmax=128, psum_fmax=512, gemm_stationary_fmax=128, gemm_moving_fmax=512)
    return nl


def _module(name: str, functions: dict) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in functions.items():
        setattr(module, key, value)
    return module


def _replaced(module: str) -> bool:
    return module in ("nki", "nki_kernels.nki") or module.startswith(("nki.", "nki_kernels.nki."))


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Makes `import nki`, `nki.isa`, `nki.language` give the emulator, and nki_kernels.nki import
    afresh against it; both are undone on exit."""
    from nki_kernels import emulated_isa

    saved = {k: v for k, v in sys.modules.items() if _replaced(k)}
    for key in saved:
        del sys.modules[key]
    nl = _language_module()
    isa = _module("nki.isa", emulated_isa.FUNCTIONS)
    root = _module("nki", {"jit": emulated_isa.jit, "simulate": emulated_isa.simulate, "language": nl, "isa": isa})
    root.__path__ = []
    sys.modules.update({"nki": root, "nki.language": nl, "nki.isa": isa})
    try:
        yield
    finally:
        for key in [k for k in sys.modules if _replaced(k)]:
            del sys.modules[key]
        sys.modules.update(saved)
