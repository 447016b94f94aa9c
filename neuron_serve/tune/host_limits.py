"""This host's limits, measured with torch: memory read bandwidth and matmul FLOP/s.

The development machines are not the same CPU, so a profile's achieved bandwidth and FLOP/s mean
something only beside the limits of the machine it ran on, measured in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from neuron_serve.tune.plan import Roofline


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memory_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s for a streaming read of a buffer far larger than the caches (a sum over it)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    return x.numel() * 4 / _best_seconds(lambda: x.sum(), repeats)


def matmul_flops(n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _best_seconds(lambda: a @ b, repeats)


def measure_host(dtype: torch.dtype = torch.float32) -> Roofline:
    """This host's roofline, for `plan`'s cpu row and a cpu device profile."""
    return Roofline("cpu host", memory_read_bandwidth(), matmul_flops(dtype=dtype))
