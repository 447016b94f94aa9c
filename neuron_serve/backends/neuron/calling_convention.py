"""The Neuron graphs' calling convention, shared by the compile step and the runner so they cannot drift.

Each bucket's graph wraps one of the model's pure forwards (prefill, prefill_chunk, decode). Around
them, at the graph boundary:

- **Integer inputs are int32**, as NxD Inference compiles them (the Neuron compiler handles int32
  better than int64).
- **Decode graphs take the cache already cut to their bucket** (``[..., :kv_len, :]``). ModelBuilder
  routes a call to the graph whose example input shapes equal the call's, and the decode buckets
  would otherwise all take the full cache; it also moves only ``kv_len`` positions to the device.
- **The KV cache crosses the boundary with every rank's heads** (``degree * local_kv_heads``). NxD
  hands every rank the same inputs and returns one rank's outputs, so a rank picks its own heads
  from the input by its rank id (NxD's SPMDRank, a per-rank weight) and the new keys/values are
  all-gathered over the TP group before they are returned.

That boundary is also the cost of this design: the cache goes host -> device and the new keys and
values device -> host on every call (see ``runner.py`` for the production alternative).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from neuron_serve.artifact.graphs import DECODE, PREFILL, PREFILL_CHUNK, GraphSpec
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.kv_cache import KVCache
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.parallel import TensorParallel
from neuron_serve.model.state import loadable_state

# The graph wrappers hold the model as `self.model`, so its weights are named "model.<param>".
MODEL_PREFIX = "model."
# NxD's SPMDRank registers its per-rank id as the parameter `rank`; the wrappers hold it as `spmd_rank`.
RANK_WEIGHT = "spmd_rank.rank"

Gather = Callable[[torch.Tensor], torch.Tensor]


def cache_heads(config: ModelConfig, degree: int) -> int:
    """KV heads in the host cache: every rank's own heads, replicated ones included."""
    return degree * TensorParallel(degree).local_kv_heads(config.num_key_value_heads)


def select_local_heads(cache: torch.Tensor, dim: int, rank: torch.Tensor, local_heads: int) -> torch.Tensor:
    """This rank's heads [rank*local_heads, (rank+1)*local_heads) along ``dim``; ``rank`` is a tensor
    (one graph serves every rank, so the rank can only be data)."""
    index = rank.to(torch.int32) * local_heads + torch.arange(local_heads, dtype=torch.int32, device=cache.device)
    return torch.index_select(cache, dim, index)


def gather_heads(x: torch.Tensor, gather_last_dim: Gather) -> torch.Tensor:
    """[..., local_heads, hd] on every rank -> [..., degree*local_heads, hd], in rank order.
    ``gather_last_dim`` concatenates the ranks' tensors along the last dimension."""
    *lead, heads, hd = x.shape
    gathered = gather_last_dim(x.reshape(*lead, heads * hd))
    return gathered.view(*lead, -1, hd)


class _NeuronGraph(nn.Module):
    def __init__(self, model: LlamaModel):
        super().__init__()
        self.model = model
        self.degree = model.tp.degree
        self.local_heads = model.layers[0].self_attn.n_kv_heads
        if self.degree > 1:
            from neuronx_distributed.parallel_layers.layers import SPMDRank
            from neuronx_distributed.parallel_layers.mappings import gather_from_tensor_model_parallel_region

            self.spmd_rank = SPMDRank(self.degree)
            self._gather = gather_from_tensor_model_parallel_region

    def local(self, cache: torch.Tensor, dim: int) -> torch.Tensor:
        return cache if self.degree == 1 else select_local_heads(cache, dim, self.spmd_rank.rank, self.local_heads)

    def returned(self, logits, keys, values):
        if self.degree == 1:
            return logits, keys, values
        return logits, gather_heads(keys, self._gather), gather_heads(values, self._gather)


class NeuronPrefill(_NeuronGraph):
    def forward(self, tokens, last_index):
        return self.returned(*self.model.prefill(tokens, last_index))


class NeuronPrefillChunk(_NeuronGraph):
    def forward(self, tokens, start, last_index, k_row, v_row):
        k_row, v_row = self.local(k_row, 1), self.local(v_row, 1)
        return self.returned(*self.model.prefill_chunk(tokens, start, last_index, k_row, v_row))


class NeuronDecode(_NeuronGraph):
    def forward(self, tokens, positions, k_cache, v_cache):
        kv_len = k_cache.shape[3]  # the bucket: the runner passes the cache cut to it
        k_cache, v_cache = self.local(k_cache, 2), self.local(v_cache, 2)
        return self.returned(*self.model.decode(tokens, positions, k_cache, v_cache, kv_len))


GRAPH_CLASSES = {PREFILL: NeuronPrefill, PREFILL_CHUNK: NeuronPrefillChunk, DECODE: NeuronDecode}


def neuron_graph(model: LlamaModel, spec: GraphSpec) -> nn.Module:
    return GRAPH_CLASSES[spec.kind](model)


def example_inputs(
    spec: GraphSpec, config: ModelConfig, degree: int, batch_size: int, max_seq_len: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """Inputs of the exact shapes and dtypes the runner calls ``spec``'s graph with."""

    def ints(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.int32)

    def cache(slots: int, length: int) -> KVCache:
        return KVCache.allocate(config, slots, length, cache_heads(config, degree), dtype)

    if spec.kind == PREFILL:
        return ints(1, spec.bucket), ints(1)
    if spec.kind == PREFILL_CHUNK:
        return ints(1, spec.bucket), ints(1), ints(1), *cache(1, max_seq_len).row(0)
    decode_cache = cache(batch_size, spec.bucket)
    return ints(batch_size), ints(batch_size), decode_cache.keys, decode_cache.values


def check_distinct_shapes(inputs: Mapping[str, tuple[torch.Tensor, ...]]) -> None:
    """ModelBuilder routes a call by its input shapes alone: two graphs must never share them."""
    seen: dict[str, str] = {}
    for name, tensors in inputs.items():
        shapes = str([list(t.shape) for t in tensors])
        if shapes in seen:
            raise ValueError(f"graphs {seen[shapes]} and {name} take the same input shapes {shapes}")
        seen[shapes] = name


def rank_weights(
    shards: list[dict[str, torch.Tensor]], config: ModelConfig, max_seq_len: int
) -> list[dict[str, torch.Tensor]]:
    """Each rank's weights for the loaded graphs, from the artifact's own shards (``weights/rank{r}``).

    Our shards split tensors exactly as NxD would for the parallel layers (``sharding.py``: the
    same dimension, in rank order), so the artifact keeps one copy of the weights. Beyond renaming,
    the graphs also need: the tied lm_head, o_proj's bias on every rank (NxD's RowParallelLinear adds
    it once after its reduce; our shards keep it on rank 0 only), the RoPE tables (buffers, which the
    trace may take as weights) and, with TP, each rank's id for SPMDRank.
    """
    degree = len(shards)
    out = []
    for rank, shard in enumerate(shards):
        state = loadable_state(shard, config, max_seq_len)
        weights = {MODEL_PREFIX + name: tensor for name, tensor in state.items()}
        for name, tensor in shards[0].items():
            if name.endswith("o_proj.bias"):
                weights[MODEL_PREFIX + name] = tensor
        if degree > 1:
            weights[RANK_WEIGHT] = torch.tensor([rank], dtype=torch.int32)
        out.append(weights)
    return out
