"""Runners for one rank on the CPU: the AOTInductor step graph of an artifact, or the eager model."""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from safetensors.torch import load_file

from neuron_serve.artifact.compile_cache import CompileCache
from neuron_serve.artifact.graphs import GraphSet, GraphUse
from neuron_serve.artifact.manifest import ArtifactManifest
from neuron_serve.backends.base import Forward, LoadTimes
from neuron_serve.backends.cpu.compile import kernel_profiled_graph
from neuron_serve.backends.cpu.export import DECODE_MODEL, STEP_MODEL, constants_map
from neuron_serve.model import cpu_kernels
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.kv_cache import KVCache
from neuron_serve.model.llama import LlamaModel, reads_exact_decode_keys
from neuron_serve.model.parallel import TensorParallel
from neuron_serve.model.quantization import QuantSpec, bf16_copy_bytes
from neuron_serve.model.state import loadable_state, model_from_state_dict
from neuron_serve.model.step import StepBatch, decode_tensors, logit_rows, step_kept, step_tensors
from neuron_serve.weights.local_cache import cache_dir

GraphOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # logits, keys, values


class StepRunner(ABC):
    """Runs each engine step as one call of the step graph (``model/step.py``) at the graph set's
    bucket shape, and keeps what is real of its keys and values in the KV cache. Where the decode
    rows read their own cached positions (`exact_decode_keys`), a step without prompts runs the
    decode graph instead, and the KV bucket of a step with prompts only holds the continued prompt's."""

    graphs: GraphSet
    cache: KVCache
    exact_decode_keys: bool

    @abstractmethod
    def run_step(self, inputs: tuple[torch.Tensor, ...]) -> GraphOutput:
        """The step graph on `step_tensors`' inputs followed by the cache's keys and values."""

    @abstractmethod
    def run_decode(self, inputs: tuple[torch.Tensor, ...]) -> GraphOutput:
        """The decode graph (``LlamaModel.decode``) on `decode_tensors` followed by the cache's keys
        and values; only where `exact_decode_keys`."""

    def step(self, batch: StepBatch) -> Forward:
        shape, uses = self.graphs.step_shape(batch)
        if self.exact_decode_keys and not batch.chunks:
            return self._decode_step(batch, shape.decode_rows, uses)
        if self.exact_decode_keys:
            shape = self.graphs.exact_decode_shape(batch, shape)
        logits, keys, values = self.run_step((*step_tensors(batch, shape), self.cache.keys, self.cache.values))
        rows, slots, positions = step_kept(batch, shape)
        self.cache.store(slots, positions, keys[:, 0, rows], values[:, 0, rows])
        return Forward(logits[logit_rows(batch, shape)], uses)

    def _decode_step(self, batch: StepBatch, rows: int, uses: list[GraphUse]) -> Forward:
        tokens, positions = decode_tensors(batch, rows)
        logits, keys, values = self.run_decode((tokens, positions, self.cache.keys, self.cache.values))
        slots = torch.tensor(batch.decode_slots, dtype=torch.long)
        self.cache.store(slots, positions[slots], keys[:, slots, 0], values[:, slots, 0])
        return Forward(logits[slots], uses)

    def close(self) -> None:  # noqa: B027 (a runner in one process has nothing to release)
        """Nothing to release: the cache and the graphs go with the process."""


class EagerRunner(StepRunner):
    """The PyTorch model called directly (no tracing)."""

    def __init__(self, model: LlamaModel, graphs: GraphSet, weight_copies: int = 0):
        self.model = model
        self.graphs = graphs
        self.exact_decode_keys = model.exact_decode_keys
        self.cache = allocate_cache(model.config, model.tp, graphs, model.dtype, weight_copies)

    @torch.inference_mode()
    def run_step(self, inputs: tuple[torch.Tensor, ...]) -> GraphOutput:
        return self.model.step(*inputs)

    @torch.inference_mode()
    def run_decode(self, inputs: tuple[torch.Tensor, ...]) -> GraphOutput:
        return self.model.decode(*inputs, self.model.max_seq_len)


class AOTRunner(StepRunner):
    """Calls the compiled step graph, which holds no weights of its own: it is handed this rank's.
    `package` replaces the artifact's own build of the graph (`neuron-serve profile`'s)."""

    def __init__(
        self, directory: Path, manifest: ArtifactManifest, rank: int, times: LoadTimes, package: Path | None = None
    ):
        self.graphs = GraphSet.from_shapes(manifest.recipe.shapes)
        started = time.perf_counter()
        self.weights = rank_state(directory, manifest, rank)
        (record,) = manifest.graphs
        cpu_kernels.load()  # the operators the graphs call
        self.exact_decode_keys = reads_exact_decode_keys(frozenset(manifest.recipe.kernels.enabled), "cpu")
        path = package or Path(directory) / record.file
        self.package = load_graph(path, STEP_MODEL, self.weights)
        self.decode_package = load_graph(path, DECODE_MODEL, self.weights) if self.exact_decode_keys else None
        times.measure("load_graphs", started)
        tp, dtype = TensorParallel(manifest.recipe.target.tp_degree, rank), self.weights["embed_tokens.weight"].dtype
        copies = bf16_copy_bytes(self.weights, QuantSpec.of(manifest.recipe.quantization), dtype)
        self.cache = allocate_cache(manifest.model_config, tp, self.graphs, dtype, copies)

    def run_step(self, inputs: tuple[torch.Tensor, ...]) -> GraphOutput:
        return tuple(self.package.run(inputs))

    def run_decode(self, inputs: tuple[torch.Tensor, ...]) -> GraphOutput:
        return tuple(self.decode_package.run(inputs))


def load_graph(path: Path, model: str, weights: dict[str, torch.Tensor]) -> torch._C._aoti.AOTIModelPackageLoader:
    """One compiled graph of the package, on the rank's `weights` (shared, not copied), through
    AOTInductor's own loader. `torch._inductor.aoti_load_package` wraps the same loader, but importing
    it imports torch._inductor and dynamo (2 to 3.5 s of a replica's start on 2 cores), and its call
    parses the argument spec again on every step; the graphs take a flat tuple of tensors and return
    one, so the wrapper adds nothing."""
    package = torch._C._aoti.AOTIModelPackageLoader(str(path), model, False, 1, -1)
    package.load_constants(
        constants_map(package, weights), use_inactive=False, check_full_update=True, user_managed=True
    )
    return package


def allocate_cache(
    config: ModelConfig, tp: TensorParallel, graphs: GraphSet, dtype: torch.dtype, weight_copies: int = 0
) -> KVCache:
    """This rank's KV cache, refused with the figures when it and the quantized kernels' bf16 weight
    copies (`quantization.bf16_copy_bytes`) would not fit in the memory left."""
    kv_heads = tp.local_kv_heads(config.num_key_value_heads)
    needed = KVCache.nbytes(config, graphs.batch_size, graphs.max_seq_len, kv_heads, dtype)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed + weight_copies > available:
        copies = (
            f" and the quantized layers' bf16 copies {weight_copies / 2**30:.2f} GiB (model.dtype float32 "
            "or quantization.method none makes none)"
            if weight_copies
            else ""
        )
        raise MemoryError(
            f"the KV cache needs {needed / 2**30:.2f} GiB (shapes.batch_size {graphs.batch_size} x "
            f"shapes.max_seq_len {graphs.max_seq_len}){copies} but {available / 2**30:.2f} GiB of memory is free"
        )
    return KVCache.for_rank(config, tp, graphs.batch_size, graphs.max_seq_len, dtype)


def rank_state(directory: Path, manifest: ArtifactManifest, rank: int) -> dict[str, torch.Tensor]:
    shard = load_file(Path(directory) / manifest.weights[rank])
    return loadable_state(shard, manifest.model_config, manifest.recipe.shapes.max_seq_len)


def kernel_profiled_runner(directory: Path, manifest: ArtifactManifest) -> StepRunner:
    """A runner whose graph shows its kernels to torch.profiler (`compile.kernel_profiled_graph`; an
    eager artifact's operators show anyway), for rank 0 of a single-rank artifact."""
    if manifest.recipe.target.tp_degree > 1:
        raise ValueError(
            f"profiling runs one rank in this process; the artifact has target.tp_degree "
            f"{manifest.recipe.target.tp_degree}: profile a tp_degree 1 build of the recipe"
        )
    if not manifest.graphs:
        return open_rank_runner(directory, manifest, 0, LoadTimes())
    package = kernel_profiled_graph(directory, manifest, CompileCache(cache_dir()))
    return AOTRunner(directory, manifest, 0, LoadTimes(), package)


def open_rank_runner(directory: Path, manifest: ArtifactManifest, rank: int, times: LoadTimes) -> StepRunner:
    """This rank's runner: the AOT graphs, or the eager model when the recipe compiled none."""
    if manifest.graphs:
        return AOTRunner(directory, manifest, rank, times)
    started = time.perf_counter()
    recipe = manifest.recipe
    tp = TensorParallel(recipe.target.tp_degree, rank)
    shard = load_file(Path(directory) / manifest.weights[rank])
    kernels = frozenset(recipe.kernels.enabled)
    quantization = QuantSpec.of(recipe.quantization)
    model = model_from_state_dict(manifest.model_config, shard, recipe.shapes.max_seq_len, tp, kernels, quantization)
    times.measure("load_graphs", started)
    copies = bf16_copy_bytes(shard, quantization, model.dtype)
    return EagerRunner(model, GraphSet.from_shapes(recipe.shapes), copies)
