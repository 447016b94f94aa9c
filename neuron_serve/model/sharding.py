"""Megatron-style tensor-parallel split of a state dict.

q/k/v and gate/up are column-parallel (each rank holds a slice of the output features), o and down
are row-parallel (a slice of the input features, followed by one all-reduce each). Embeddings, norms
and lm_head are replicated (see `LlamaModel`). With fewer KV heads than ranks, each KV head is
replicated to the ranks whose query heads use it, as NxD Inference's REPLICATE_TO_TP_DEGREE does.

A quantized layer's scales and offsets (``quantization.py``) go with its weight: cut with its rows
when column-parallel; when row-parallel, cut with its input groups, or kept whole by every rank when
there is one scale per output channel (``[out, 1]``), which each rank applies to its partial sum.
"""

from __future__ import annotations

import torch

from neuron_serve.model.config import ModelConfig

COLUMN_PARALLEL = ("q_proj", "gate_proj", "up_proj")
KV_PROJECTIONS = ("k_proj", "v_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def _role(name: str) -> str:
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
    if module in COLUMN_PARALLEL:
        return "column"
    if module in KV_PROJECTIONS:
        return "kv"
    if module in ROW_PARALLEL:
        return "bias" if name.endswith(".bias") else "row"
    return "replicated"


def kv_head_range(config: ModelConfig, degree: int, rank: int) -> tuple[int, int]:
    """The KV heads [first, last) that `rank` holds."""
    kv = config.num_key_value_heads
    if kv >= degree:
        per_rank = kv // degree
        return rank * per_rank, (rank + 1) * per_rank
    head = rank // (degree // kv)
    return head, head + 1


def shard_tensor(config: ModelConfig, name: str, tensor: torch.Tensor, degree: int, rank: int) -> torch.Tensor | None:
    """Rank `rank`'s part of one tensor (None: the tensor has no part on this rank)."""
    role = _role(name)
    if degree == 1 or role == "replicated":
        return tensor
    if role == "column":
        return tensor.chunk(degree, dim=0)[rank].contiguous()
    if role == "row":
        return tensor if tensor.shape[1] == 1 else tensor.chunk(degree, dim=1)[rank].contiguous()
    if role == "bias":  # o_proj's bias is added once, after the all-reduce would sum it `degree` times
        return tensor if rank == 0 else None
    first, last = kv_head_range(config, degree, rank)
    return tensor[first * config.head_dim : last * config.head_dim].contiguous()


def shard_state_dict(
    config: ModelConfig, state_dict: dict[str, torch.Tensor], degree: int, rank: int
) -> dict[str, torch.Tensor]:
    shards = {}
    for name, tensor in state_dict.items():
        part = shard_tensor(config, name, tensor, degree, rank)
        if part is not None:
            shards[name] = part
    return shards
