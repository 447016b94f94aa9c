"""`NeuronRunner`: the compiled Neuron graphs of an artifact, on this process's NeuronCores.

One replica is one process whose NeuronCores are named by ``NEURON_RT_VISIBLE_CORES`` (one core
per TP rank, set by the server for each worker). The graphs are loaded with `sdk.load_compiled`,
each rank given its shard of the artifact's own weights (``weights/rank{r}.safetensors``).

What this runner costs, honestly: the graphs are the model's pure functions, so the KV cache lives
on the host. Every decode step sends ``kv_len`` positions of the cache of every slot to every rank and
gets this step's keys and values back; a prefill chunk sends its slot's whole cache row. That traffic
grows with batch size x context length and dominates decode latency for long contexts.

Follow-up, not built here -- a device-resident KV cache, as NxD Inference's KVCacheManager keeps it:
the cache becomes state of the traced module (one ``nn.Parameter`` per layer for K and one for V, each
``[slots, kv_heads_per_rank, max_seq_len, head_dim]``, allocated on each rank's core by NxD's
StateInitializer), every graph returns the scatter-updated cache, and ``input_output_aliases``
(set per graph in `sdk._model_instance`) maps those outputs onto the parameters, so the update
happens in place on the device. The graphs then take token ids and positions, return only logits, and
the host holds no KV at all; the forwards in ``model/llama.py`` would gain the cache write that they now
leave to the caller, and the per-rank head selection and gathers in ``calling_convention.py`` would go.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from neuron_serve.artifact.graphs import GraphSet, GraphSpec
from neuron_serve.artifact.manifest import ArtifactManifest
from neuron_serve.backends.base import LoadTimes
from neuron_serve.backends.bucketed import BucketedRunner, GraphOutput
from neuron_serve.backends.neuron import sdk
from neuron_serve.backends.neuron.calling_convention import cache_heads, rank_weights
from neuron_serve.backends.neuron.cores import visible_core_count
from neuron_serve.model.kv_cache import KVCache

GRAPHS_DIR = "graphs"

# (graphs directory, tp_degree, each rank's weights) -> a callable that routes by input shapes
GraphLoader = Callable[..., Any]


def check_visible_cores(tp_degree: int) -> None:
    """A replica must see exactly its TP degree of cores: the runtime reserves every visible core for
    this process, so extra ones would be held away from the other replicas."""
    visible = os.environ.get("NEURON_RT_VISIBLE_CORES")
    if visible is not None and visible_core_count(visible) != tp_degree:
        raise ValueError(
            f"NEURON_RT_VISIBLE_CORES={visible} names {visible_core_count(visible)} NeuronCores, "
            f"but the artifact was compiled for tp_degree {tp_degree} (one core per rank)"
        )


def _int32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(torch.int32) for t in tensors]


class NeuronRunner(BucketedRunner):
    """Calls the compiled graphs with the inputs `calling_convention.example_inputs` describes; owns the host KV
    cache, which holds every rank's KV heads (`calling_convention.cache_heads`)."""

    def __init__(self, directory: Path, manifest: ArtifactManifest, times: LoadTimes, load: GraphLoader | None = None):
        recipe, config = manifest.recipe, manifest.model_config
        degree = recipe.target.tp_degree
        self.graphs = GraphSet.from_shapes(recipe.shapes)
        check_visible_cores(degree)
        started = time.perf_counter()
        shards = [load_file(Path(directory) / name) for name in manifest.weights]
        weights = rank_weights(shards, config, self.graphs.max_seq_len)
        load = load or sdk.load_compiled
        self.model = load(Path(directory) / GRAPHS_DIR, degree, weights=weights)
        times.measure("load_graphs", started)
        slots, length, heads = self.graphs.batch_size, self.graphs.max_seq_len, cache_heads(config, degree)
        self.cache = KVCache.allocate(config, slots, length, heads, recipe.model.torch_dtype)

    def run_prefill(self, spec: GraphSpec, tokens, last_index) -> GraphOutput:
        return self.model(*_int32(tokens, last_index))

    def run_prefill_chunk(self, spec: GraphSpec, tokens, start, last_index, slot: int) -> GraphOutput:
        k_row, v_row = (part.contiguous() for part in self.cache.row(slot))
        return self.model(*_int32(tokens, start, last_index), k_row, v_row)

    def run_decode(self, spec: GraphSpec, tokens, positions) -> GraphOutput:
        # Cut to the bucket here: the decode graphs differ only in this length, which is how the
        # loaded model tells them apart (it routes by input shapes).
        k_cache = self.cache.keys[:, :, :, : spec.bucket].contiguous()
        v_cache = self.cache.values[:, :, :, : spec.bucket].contiguous()
        return self.model(*_int32(tokens, positions), k_cache, v_cache)
