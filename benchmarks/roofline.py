"""This machine's limits: memory read bandwidth and matmul FLOP/s, measured with torch."""

from __future__ import annotations

import time

import torch


def _best_seconds(fn, repeats: int) -> float:
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


if __name__ == "__main__":
    print(f"threads {torch.get_num_threads()}")
    print(f"memory read bandwidth {memory_read_bandwidth() / 1e9:.1f} GB/s")
    print(
        f"fp32 matmul {matmul_flops() / 1e9:.0f} GFLOP/s; bf16 {matmul_flops(dtype=torch.bfloat16) / 1e9:.0f} GFLOP/s"
    )
