"""Runners for one rank on the CPU: the AOTInductor graphs of an artifact, or the eager model."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from neuron_serve.artifact.graphs import GraphSet, GraphSpec
from neuron_serve.artifact.manifest import ArtifactManifest
from neuron_serve.backends.base import LoadTimes
from neuron_serve.backends.bucketed import BucketedRunner, GraphOutput
from neuron_serve.backends.cpu.export import constants_map
from neuron_serve.model.kv_cache import KVCache
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.parallel import TensorParallel
from neuron_serve.model.state import loadable_state, model_from_state_dict


class EagerRunner(BucketedRunner):
    """The PyTorch model called directly (no tracing)."""

    def __init__(self, model: LlamaModel, graphs: GraphSet):
        self.model = model
        self.graphs = graphs
        self.cache = model.new_kv_cache(graphs.batch_size)

    @torch.inference_mode()
    def run_prefill(self, spec: GraphSpec, tokens, last_index) -> GraphOutput:
        return self.model.prefill(tokens, last_index)

    @torch.inference_mode()
    def run_prefill_chunk(self, spec: GraphSpec, tokens, start, last_index, slot: int) -> GraphOutput:
        return self.model.prefill_chunk(tokens, start, last_index, *self.cache.row(slot))

    @torch.inference_mode()
    def run_decode(self, spec: GraphSpec, tokens, positions) -> GraphOutput:
        return self.model.decode(tokens, positions, self.cache.keys, self.cache.values, spec.bucket)


class AOTRunner(BucketedRunner):
    """Calls the compiled graphs; every graph shares the one copy of this rank's weights."""

    def __init__(self, directory: Path, manifest: ArtifactManifest, rank: int, times: LoadTimes):
        self.graphs = GraphSet.from_shapes(manifest.recipe.shapes)
        started = time.perf_counter()
        self.weights = rank_state(directory, manifest, rank)
        self.packages = {}
        for record in manifest.graphs:
            package = torch._inductor.aoti_load_package(str(Path(directory) / record.file))
            package.load_constants(constants_map(package, self.weights), check_full_update=True, user_managed=True)
            self.packages[record.name] = package
        times.measure("load_graphs", started)
        tp, dtype = TensorParallel(manifest.recipe.target.tp_degree, rank), self.weights["embed_tokens.weight"].dtype
        slots, length = self.graphs.batch_size, self.graphs.max_seq_len
        self.cache = KVCache.for_rank(manifest.model_config, tp, slots, length, dtype)

    def run_prefill(self, spec: GraphSpec, tokens, last_index) -> GraphOutput:
        return self.packages[spec.name](tokens, last_index)

    def run_prefill_chunk(self, spec: GraphSpec, tokens, start, last_index, slot: int) -> GraphOutput:
        return self.packages[spec.name](tokens, start, last_index, *self.cache.row(slot))

    def run_decode(self, spec: GraphSpec, tokens, positions) -> GraphOutput:
        return self.packages[spec.name](tokens, positions, self.cache.keys, self.cache.values)


def rank_state(directory: Path, manifest: ArtifactManifest, rank: int) -> dict[str, torch.Tensor]:
    shard = load_file(Path(directory) / manifest.weights[rank])
    return loadable_state(shard, manifest.model_config, manifest.recipe.shapes.max_seq_len)


def open_rank_runner(directory: Path, manifest: ArtifactManifest, rank: int, times: LoadTimes) -> BucketedRunner:
    """This rank's runner: the AOT graphs, or the eager model when the recipe compiled none."""
    if manifest.graphs:
        return AOTRunner(directory, manifest, rank, times)
    started = time.perf_counter()
    recipe = manifest.recipe
    tp = TensorParallel(recipe.target.tp_degree, rank)
    shard = load_file(Path(directory) / manifest.weights[rank])
    kernels = frozenset(recipe.kernels.enabled)
    model = model_from_state_dict(manifest.model_config, shard, recipe.shapes.max_seq_len, tp, kernels)
    times.measure("load_graphs", started)
    return EagerRunner(model, GraphSet.from_shapes(recipe.shapes))
