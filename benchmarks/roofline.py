"""This machine's limits: memory read bandwidth and matmul FLOP/s (measured by `neuron_serve.tune.host_limits`)."""

from __future__ import annotations

import torch

from neuron_serve.tune.host_limits import matmul_flops, memory_read_bandwidth

if __name__ == "__main__":
    print(f"threads {torch.get_num_threads()}")
    print(f"memory read bandwidth {memory_read_bandwidth() / 1e9:.1f} GB/s")
    print(
        f"fp32 matmul {matmul_flops() / 1e9:.0f} GFLOP/s; bf16 {matmul_flops(dtype=torch.bfloat16) / 1e9:.0f} GFLOP/s"
    )
