"""The static KV cache: its shape, its layout and the writes into it.

Layout ``[layers, slots, kv_heads, max_seq_len, head_dim]``, one tensor for keys and one for values,
as NxD Inference lays out a rank's cache: a slot's row is contiguous per layer and head, so a decode
step reads ``[..., :kv_len, :]`` of it as one strided block. The model's forwards only read the cache
and return the keys and values they made. Where the cache lives:

- on the host (cpu): the runner stores what is real of them with `store`, so the compiled graph is a
  pure function;
- on the device (neuron): the cache is state of the graph, which returns it `written` and whose
  outputs alias it, so the write happens in place. Such a cache has one more slot than the batch
  (`device_slots`): the scratch row where a step's pad rows write, as NxD Inference's
  ``kv_cache_padding_size`` garbage row.
"""

from __future__ import annotations

import math
import mmap
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
        return cls(_zeros_on_first_touch(shape, dtype), _zeros_on_first_touch(shape, dtype))

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

    @staticmethod
    def device_slots(batch_size: int) -> int:
        """Slots of a cache its graphs write themselves: one per sequence, then the scratch row."""
        return batch_size + 1

    @staticmethod
    def written(cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """`cache` with new keys or values ([layers, N, kv_heads, hd]) at (slots[n], positions[n]), as a
        new tensor (a traced graph returns it; its alias makes the write in place on the device). Every
        dimension is indexed, so the write is one scatter of N rows per layer and head."""
        layers, _, heads, _, _ = cache.shape
        index = (
            torch.arange(layers, device=cache.device).view(-1, 1, 1),
            slots.view(1, -1, 1),
            torch.arange(heads, device=cache.device).view(1, 1, -1),
            positions.view(1, -1, 1),
        )
        return cache.index_put(index, new)

    def store(self, slots: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a step's kept keys/values ([layers, N, kv_heads, hd]), the n-th at (slots[n], positions[n])."""
        # Advanced indices split by a slice put their dimension first: the target is [N, layers, kv, hd].
        self.keys[:, slots, :, positions] = keys.transpose(0, 1)
        self.values[:, slots, :, positions] = values.transpose(0, 1)


def _zeros_on_first_touch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros in an anonymous mapping, whose pages the kernel maps (zeroed) when first touched:
    `torch.zeros` writes every page up front, 2 to 11 s for the default model's 2.8 GiB on a 2-core
    VM, before a replica can answer. The cache fills slot by slot, so most pages wait until used.
    Zeros, not whatever the memory held: a step reads its bucket's padded positions too, masked by
    adding to their scores, and a NaN or an infinity there would get through the mask."""
    buffer = mmap.mmap(-1, math.prod(shape) * dtype.itemsize)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)
