"""Tensor-parallel context: which rank this process is, and the all-reduce after row-parallel layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    degree: int = 1
    rank: int = 0

    def local_kv_heads(self, kv_heads: int) -> int:
        """KV heads held by one rank. With fewer KV heads than ranks each KV head is replicated
        (NxD Inference's REPLICATE_TO_TP_DEGREE), so every rank holds one."""
        return max(1, kv_heads // self.degree)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.degree == 1:
            return x
        # Functional collective: traceable by torch.export, and plain eager elsewhere.
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(x, "sum", dist.group.WORLD)
