"""The Neuron graphs' calling convention, shared by the compile step and the runner so they cannot drift.

Every graph is the model's step (``model/step.py``) at one static shape (`GraphSet.compiled_shapes`),
and two facts of neuronx-distributed's ModelBuilder (NxD 2.29, ``trace/model_builder.py``
``build_nxd_model`` and ``trace/spmd.py`` ``NxDModel``) shape the boundary:

- **One argument list for every graph.** The saved model is one ``torch.jit.trace`` of
  ``NxDModelExecutor`` made from the example inputs of the *last* graph added, and its router picks
  the graph whose example input shapes equal the call's (``str([list(t.shape) ...])``). So every
  graph takes `STEP_INPUTS`, all int32 (as NxD Inference compiles them), and no two graphs share
  their input shapes (`check_distinct_shapes`; NxD would let the later one overwrite the earlier).
  Every input is O(S + P + L) integers: the graph makes the step's mask itself (`visible_keys`),
  and the KV bucket L is the shape of `key_positions`.
- **The KV cache is device state.** It is two parameters of the graph module, each rank's own KV
  heads in `KVCache`'s layout with `KVCache.device_slots` rows. Each graph returns the logits, then
  the caches with this step's keys and values written (`KVCache.written`); `cache_aliases` maps
  those outputs onto the parameters, which makes them states: the runtime allocates them once per
  rank (zeroed by NxD's ``StateInitializer``), shares them by name across every graph, writes them
  in place, and returns only the outputs that are not aliased, the logits.

So a step moves its token ids and positions to the device and its logits back, never the cache.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.kv_cache import KVCache
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.state import loadable_state
from neuron_serve.model.step import StepBatch, StepShape, compact_step_tensors, step_writes, visible_keys

# The graph module holds the model as `self.model`, so its weights are named "model.<param>".
MODEL_PREFIX = "model."
STEP_INPUTS = (
    "decode_tokens",
    "decode_positions",
    "tokens",
    "positions",
    "cached_slot",
    "segments",
    "cache_lens",
    "key_positions",
    "last_index",
    "write_slots",
    "write_positions",
)
CACHE_STATES = ("k_cache", "v_cache")  # the graph's outputs 1 and 2 alias these parameters


class NeuronStep(nn.Module):
    """One step graph: the model's step on the cache it holds, returning (logits, keys, values)."""

    def __init__(self, model: LlamaModel, batch_size: int):
        super().__init__()
        self.model = model
        cache = model.new_kv_cache(KVCache.device_slots(batch_size))
        self.k_cache = nn.Parameter(cache.keys, requires_grad=False)
        self.v_cache = nn.Parameter(cache.values, requires_grad=False)

    def forward(self, *inputs: torch.Tensor):
        """The `STEP_INPUTS`, in order."""
        *head, segments, cache_lens, key_positions, last_index, write_slots, write_positions = inputs
        visible = visible_keys(segments, cache_lens, key_positions)
        logits, keys, values = self.model.step(*head, visible, last_index, self.k_cache, self.v_cache)
        k_cache = KVCache.written(self.k_cache, write_slots, write_positions, keys[:, 0])
        v_cache = KVCache.written(self.v_cache, write_slots, write_positions, values[:, 0])
        return logits, k_cache, v_cache

    def cache_aliases(self) -> dict[nn.Parameter, int]:
        """ModelBuilder's ``input_output_aliases``: each cache parameter -> the output that updates it."""
        return {getattr(self, name): index for index, name in enumerate(CACHE_STATES, start=1)}


def step_inputs(batch: StepBatch, shape: StepShape, batch_size: int) -> tuple[torch.Tensor, ...]:
    """The `STEP_INPUTS` of ``batch`` at ``shape``, int32."""
    writes = step_writes(batch, shape, scratch_slot=batch_size)
    return tuple(t.to(torch.int32) for t in (*compact_step_tensors(batch, shape), *writes))


def example_inputs(graphs: GraphSet) -> dict[str, tuple[torch.Tensor, ...]]:
    """Every graph's example inputs by name, in `compiled_shapes` order, checked to be routable."""
    inputs = {
        graph_name(shape): step_inputs(StepBatch(), shape, graphs.batch_size) for shape in graphs.compiled_shapes()
    }
    check_distinct_shapes(inputs)
    return inputs


def graph_name(shape: StepShape) -> str:
    return f"step_{shape.decode_rows}x{shape.prompt_tokens}x{shape.prompts}x{shape.kv_len}"


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
    the graphs also need the tied lm_head, o_proj's bias on every rank (NxD's RowParallelLinear adds
    it once after its reduce; our shards keep it on rank 0 only) and the RoPE tables (buffers, which
    the trace may take as weights). The caches are states, which the runtime allocates itself.
    """
    out = []
    for shard in shards:
        state = loadable_state(shard, config, max_seq_len)
        weights = {MODEL_PREFIX + name: tensor for name, tensor in state.items()}
        for name, tensor in shards[0].items():
            if name.endswith("o_proj.bias"):
                weights[MODEL_PREFIX + name] = tensor
        out.append(weights)
    return out
