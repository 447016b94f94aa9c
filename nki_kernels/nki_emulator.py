"""A numpy model of the NKI 0.5 instructions that the kernels in nki_kernels.nki use.

Where the real `nki` package is absent, the tests install this as `nki`, `nki.isa` and
`nki.language` (see `installed()`) and run the kernels through it. It
  - checks NeuronCore-v2 limits: <= 128 partitions, nc_matmul stationary [K<=128, M<=128], moving
    [K, N<=512], dst one fp32 PSUM bank; operands in the right memories; no DMA from PSUM;
    activation bias a [P, 1] vector (v2 has no scalar bias); memset values of the tile's type;
  - counts the live SBUF and PSUM bytes per partition against their capacity (192 KiB, 16 KiB) and
    raises when a kernel would overflow them; `peak_bytes()` gives the last run's peaks (the model
    of a tile's lifetime is in emulator_core.OnChipMemory);
  - rejects slices of slices (NKI 0.3 had none; the kernels keep to that), slice objects kept in
    variables (NKI takes `a:b` written at the index site, or nl.ds), tiles used after the loop
    iteration that allocated them, and fills new tiles with NaN, so that a read of memory nobody
    wrote shows up in the results;
  - computes each instruction's documented semantics in fp32 and stores at the destination's dtype
    (bf16 rounded to nearest even).
It is not AWS's simulator: it says nothing about whether the NKI compiler accepts the code or how
fast it runs, only whether the algorithm, indexing, tile shapes and on-chip footprint are right.

This module is nki.language and `installed()`; nki.isa, nki.jit and nki.simulate are in
nki_kernels.emulated_isa, and what both use (tiles, dtypes, operators, the rule check, the SBUF/PSUM
accounting) in nki_kernels.emulator_core.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

import numpy as np

from nki_kernels import emulated_isa
from nki_kernels.emulator_core import (
    BFLOAT16,
    CAPACITY,
    FLOAT32,
    INTS,
    OPS,
    PSUM_BANK,
    DType,
    DynSlice,
    EmulatorError,
    Tile,
    check,
    on_chip_memory,
)

__all__ = ["CAPACITY", "EmulatorError", "installed", "peak_bytes"]


def peak_bytes() -> dict[str, int]:
    """The most SBUF and PSUM bytes per partition live at once in the last kernel run (nki.simulate
    call), e.g. {"sbuf": 84116, "psum": 0} for sampling at vocabulary 128256."""
    return dict(on_chip_memory().peak)


def _ndarray(shape, dtype: DType, buffer: str = "sbuf", name: str = "", address=None) -> Tile:
    shape = tuple(int(s) for s in shape)
    allocation = None
    if buffer in CAPACITY:
        check(shape[0] <= 128, f"{buffer} tile with {shape[0]} partitions (max 128)")
        per_partition = int(np.prod(shape[1:], dtype=np.int64)) * dtype.bits // 8
        check(
            buffer != "psum" or per_partition <= PSUM_BANK,
            f"psum tile of {per_partition} bytes per partition (max {PSUM_BANK}, one bank)",
        )
        allocation = on_chip_memory().allocate(buffer, per_partition)
    fill = np.nan if dtype.is_float else -(2**40)  # garbage that cannot pass for data
    array = np.full(shape, fill, dtype=np.float32 if dtype.is_float else np.int64)
    written = np.zeros(shape, dtype=bool) if buffer == "psum" else None
    return Tile(array, dtype, buffer, False, written, allocation)


def _loop(start, stop=None, step=1) -> Iterator[int]:
    """nl.affine_range / nl.sequential_range: each iteration a scope for the tiles it allocates."""
    memory = on_chip_memory()
    for i in range(start, stop, step) if stop is not None else range(start):
        with memory.iteration():
            yield i


def _static_range(start, stop=None, step=1) -> range:
    # Unrolled while tracing, like a Python loop: no scope per iteration.
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
    nl.ds = DynSlice
    nl.affine_range = nl.sequential_range = _loop
    nl.static_range = _static_range
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
