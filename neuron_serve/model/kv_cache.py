"""The static KV cache: its shape, its layout and the writes into it.

Layout ``[layers, slots, kv_heads, max_seq_len, head_dim]``, one tensor for keys and one for values,
as NxD Inference lays out a rank's cache: a slot's row is contiguous per layer and head, so a decode
step reads ``[..., :kv_len, :]`` of it as one strided block. The model's forwards only read the cache
and return the keys and values they made; the runner stores them with `store` (a step's kept rows)
or `store_prompt` (a prompt graph's), which keeps every compiled graph a pure function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from neuron_serve.model.config import ModelConfig
from neuron_serve.model.parallel import TensorParallel


@dataclass
class KVCache:
    keys: torch.Tensor
    values: torch.Tensor

    @staticmethod
    def shape(config: ModelConfig, slots: int, max_seq_len: int, kv_heads: int) -> tuple[int, ...]:
        """`kv_heads`: the heads one rank holds (`TensorParallel.local_kv_heads`), or every rank's
        heads together for a cache that serves all ranks."""
        return (config.num_hidden_layers, slots, kv_heads, max_seq_len, config.head_dim)

    @classmethod
    def allocate(cls, config: ModelConfig, slots: int, max_seq_len: int, kv_heads: int, dtype: torch.dtype) -> KVCache:
        shape = cls.shape(config, slots, max_seq_len, kv_heads)
        return cls(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))

    @classmethod
    def for_rank(
        cls, config: ModelConfig, tp: TensorParallel, slots: int, max_seq_len: int, dtype: torch.dtype
    ) -> KVCache:
        """The cache of one tensor-parallel rank: its own KV heads only."""
        return cls.allocate(config, slots, max_seq_len, tp.local_kv_heads(config.num_key_value_heads), dtype)

    @classmethod
    def nbytes(cls, config: ModelConfig, slots: int, max_seq_len: int, kv_heads: int, dtype: torch.dtype) -> int:
        """Keys and values together."""
        return 2 * math.prod(cls.shape(config, slots, max_seq_len, kv_heads)) * dtype.itemsize

    def row(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's keys and values, [layers, kv_heads, max_seq_len, head_dim] each (views)."""
        return self.keys[:, slot], self.values[:, slot]

    def store_prompt(self, slot: int, start: int, keys: torch.Tensor, values: torch.Tensor, count: int) -> None:
        """Store the first `count` positions of a prefill's keys/values ([layers, 1, T, kv_heads, hd])
        into `slot` from position `start` on."""
        self.keys[:, slot, :, start : start + count] = keys[:, 0, :count].transpose(1, 2)
        self.values[:, slot, :, start : start + count] = values[:, 0, :count].transpose(1, 2)

    def store(self, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a step's kept keys/values ([layers, N, kv_heads, hd]), the n-th at (slots[n], positions[n])."""
        # Advanced indices split by a slice put their dimension first: the target is [N, layers, kv, hd].
        self.keys[:, slots, :, positions] = keys.transpose(0, 1)
        self.values[:, slots, :, positions] = values.transpose(0, 1)
