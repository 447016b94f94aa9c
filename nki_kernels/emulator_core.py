"""What both halves of the NKI emulator share: the rule check, the dtypes, tiles, the on-chip
memory accounting and the operators.

nki_kernels.nki_emulator (nki.language and installing the emulator as `nki`) and
nki_kernels.emulated_isa (nki.isa) both build on this module, which imports neither.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# NeuronCore-v2 on-chip memories, bytes per partition (128 partitions each): SBUF 192 KiB (24 MiB in
# all); PSUM 16 KiB (2 MiB), eight 2 KiB banks, and one tile must fit in one bank.
CAPACITY = {"sbuf": 192 * 1024, "psum": 16 * 1024}
PSUM_BANK = 2 * 1024


class EmulatorError(AssertionError):
    """The kernel broke a rule the hardware or the NKI 0.5 language imposes."""


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


class Allocation:
    """The bytes per partition that one SBUF or PSUM tile holds while it is live."""

    def __init__(self, memory: OnChipMemory, buffer: str, nbytes: int):
        self.memory, self.buffer, self.nbytes, self.live = memory, buffer, nbytes, True

    def release(self) -> None:
        if self.live:
            self.live = False
            self.memory.live[self.buffer] -= self.nbytes

    def __del__(self) -> None:
        self.release()


class OnChipMemory:
    """Live and peak bytes per partition of SBUF and PSUM over one kernel run.

    A tile counts its free-dim bytes (elements x dtype size) per partition from nl.ndarray until
      - the end of the nl.affine_range / nl.sequential_range iteration that allocated it: the NKI
        compiler scopes a tensor declared in a loop body to one iteration and reuses its memory in
        the next, so a tile touched after its iteration ended (its memory another's by then)
        raises EmulatorError;
      - or, sooner, when Python drops the last reference to it and to its views: a helper's tiles
        when it returns, a name's tile when the name is rebound. This stands in for the compiler's
        liveness analysis (which frees a tile after its last use) and is later than it in one case:
        a name rebound in a plain Python loop still holds the previous iteration's tile while the new
        one is allocated, so per-iteration tiles belong in a helper function or an nl loop.
    An allocation that would take the live bytes past CAPACITY raises EmulatorError. The figures
    are for one buffer per tile: the compiler may double-buffer a tile across the iterations of an
    affine_range loop (to overlap its DMA with compute), which needs more, and PSUM is counted in
    bytes, not rounded up to 2 KiB banks.
    """

    def __init__(self):
        self.live = dict.fromkeys(CAPACITY, 0)
        self.peak = dict.fromkeys(CAPACITY, 0)
        self._iterations: list[list[weakref.ref]] = []

    def allocate(self, buffer: str, nbytes: int) -> Allocation:
        live, limit = self.live[buffer], CAPACITY[buffer]
        check(
            live + nbytes <= limit,
            f"{buffer.upper()} full: allocating {nbytes} bytes per partition with {live} live "
            f"(limit {limit} per partition)",
        )
        allocation = Allocation(self, buffer, nbytes)
        self.live[buffer] += nbytes
        self.peak[buffer] = max(self.peak[buffer], self.live[buffer])
        if self._iterations:
            self._iterations[-1].append(weakref.ref(allocation))
        return allocation

    @contextlib.contextmanager
    def iteration(self) -> Iterator[None]:
        """One iteration of an nl loop: the tiles allocated in it are released when it ends."""
        self._iterations.append([])
        try:
            yield
        finally:
            for ref in self._iterations.pop():
                allocation = ref()
                if allocation is not None:
                    allocation.release()


_memory = OnChipMemory()


def on_chip_memory() -> OnChipMemory:
    """The accounting of the current (or last) kernel run."""
    return _memory


def start_kernel_run() -> OnChipMemory:
    """Fresh accounting for a kernel run: the previous run's tiles no longer count."""
    global _memory
    _memory = OnChipMemory()
    return _memory


@dataclass(frozen=True)
class DynSlice:
    """nl.ds(start, size): the slice start:start+size."""

    start: int
    size: int


@functools.cache
def _subscripts(filename: str) -> dict[tuple, ast.Subscript]:
    """The file's subscript expressions by source span (as code.co_positions gives them)."""
    try:
        tree = ast.parse(Path(filename).read_text())
    except (OSError, SyntaxError, ValueError):
        return {}
    spans = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            spans[(node.lineno, node.end_lineno, node.col_offset, node.end_col_offset)] = node
    return spans


@functools.cache
def _written_slices(code, lasti: int) -> tuple[bool, ...] | None:
    """For the subscript the instruction at lasti evaluates: which index elements are written
    `a:b` at the index site; None where the source cannot be found (Python < 3.11, no file)."""
    if not hasattr(code, "co_positions"):
        return None
    node = _subscripts(code.co_filename).get(list(code.co_positions())[lasti // 2])
    if node is None:
        return None
    elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    return tuple(isinstance(e, ast.Slice) for e in elements)


def _check_written_slices(index: tuple, frame) -> None:
    # A slice object in a variable reaches __getitem__ exactly as `t[a:b]` does, so the caller's
    # source decides; looked up once per call site.
    if not any(isinstance(i, slice) for i in index):
        return
    written = _written_slices(frame.f_code, frame.f_lasti)
    if written is None:
        return
    held = [isinstance(i, slice) for i in index]
    check(
        len(written) == len(held) and not any(h and not w for h, w in zip(held, written, strict=True)),
        f"index {index!r} holds a slice object: NKI indexes with a:b written at the index site or nl.ds(start, size)",
    )


class Tile:
    """A tensor in HBM, SBUF or PSUM; indexing gives a view, once (no slices of slices). SBUF and
    PSUM tiles and their views share the Allocation that counts their bytes."""

    def __init__(
        self, array: np.ndarray, dtype: DType, buffer: str, is_view: bool = False, written=None, allocation=None
    ):
        self.array, self.dtype, self.buffer, self.is_view = array, dtype, buffer, is_view
        self.written = written  # PSUM only: which elements an nc_matmul wrote (for auto-accumulate)
        self.allocation = allocation

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def _check_live(self) -> None:
        check(
            self.allocation is None or self.allocation.live,
            f"{self.buffer} tile {self.shape} used after the loop iteration that allocated it ended "
            "(NKI tensors are local to their loop body)",
        )

    def _view(self, array: np.ndarray, is_view: bool, written=None) -> Tile:
        return Tile(array, self.dtype, self.buffer, is_view, written, self.allocation)

    def __getitem__(self, index) -> Tile:
        check(not self.is_view, "slice of a slice: the kernels keep to one level (NKI 0.3 had no nested slicing)")
        self._check_live()
        index = index if isinstance(index, tuple) else (index,)
        _check_written_slices(index, sys._getframe(1))
        index = tuple(slice(i.start, i.start + i.size) if isinstance(i, DynSlice) else i for i in index)
        check(all(isinstance(i, int | slice) for i in index), f"unsupported index {index!r}")
        written = None if self.written is None else self.written[index]
        return self._view(self.array[index], True, written)

    def broadcast(self, dim: int, size: int) -> Tile:
        check(self.shape[dim] == 1, f"broadcast of dim {dim} of size {self.shape[dim]}")
        shape = list(self.shape)
        shape[dim] = size
        return self._view(np.broadcast_to(self.array, shape), True)

    def reshape(self, shape) -> Tile:
        return self._view(self.array.reshape(shape), self.is_view)

    def read(self) -> np.ndarray:
        self._check_live()
        return self.array.astype(np.float64)

    def write(self, values) -> None:
        self._check_live()
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
    "log": Op("log", np.log, False, True),  # nl.log, the natural-log activation of nisa.activation
}
