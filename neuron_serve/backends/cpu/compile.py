"""Compile a recipe's step graph for the CPU, looked up in the compile cache first (a graph depends on
the model's architecture and the graph set's bounds, not on the weight values)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from neuron_serve.artifact.compile_cache import CompileCache, cache_key, link_or_copy
from neuron_serve.artifact.graphs import STEP, GraphSet
from neuron_serve.artifact.manifest import ArtifactManifest, GraphRecord, toolchain_versions
from neuron_serve.backends.base import CompileJob
from neuron_serve.backends.cpu.export import compile_step_graph
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.parallel import TensorParallel
from neuron_serve.model.quantization import QuantSpec
from neuron_serve.model.state import model_from_state_dict
from neuron_serve.progress import Phase
from neuron_serve.recipe.schema import Recipe


@functools.cache
def traced_code_digest() -> str:
    """The source of everything a graph is traced from: a change to it must miss the cache, even
    before the package version is bumped."""
    import neuron_serve
    import nki_kernels

    package = Path(neuron_serve.__file__).parent
    files = sorted((package / "model").glob("*.py")) + [package / "backends" / "cpu" / "export.py"]
    files += sorted(Path(nki_kernels.__file__).parent.rglob("*.py"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def graph_cache_fields(job: CompileJob) -> dict:
    recipe, graphs = job.recipe, GraphSet.from_shapes(job.recipe.shapes)
    return {
        "graph": STEP,
        "code": traced_code_digest(),
        "model": job.config.to_dict(),
        "dtype": recipe.model.dtype,
        "tp": recipe.target.tp_degree,
        "bounds": dataclasses.asdict(graphs.step_bounds()),
        "smallest_kv_len": graphs.token_buckets[0],
        "kernels": sorted(recipe.kernels.enabled),
        "quantization": dataclasses.asdict(recipe.quantization),
        "toolchain": toolchain_versions(),
    }


def compile_cpu_graphs(job: CompileJob) -> list[GraphRecord]:
    if job.recipe.compiler.cpu_mode == "eager":
        return []
    key = cache_key(graph_cache_fields(job))
    entry = job.cache.lookup("graphs", key)
    hit = entry is not None
    if not hit:
        # One graph with dynamic step dimensions serves every bucket: graph 1 of 1, however many buckets.
        title = f"compile {job.recipe.name}: graph 1 of 1 ({STEP}, torch.export + AOTInductor)"
        with Phase(title, console=job.console):
            entry = _compile_entry(job, key)
    return [_link_graph(job, entry, key, hit)]


def _link_graph(job: CompileJob, entry: Path, key: str, hit: bool) -> GraphRecord:
    file = f"graphs/{STEP}.pt2"
    link_or_copy(entry / "graph.pt2", job.staging / file)
    job.known_sha256[file] = job.cache.checksums(entry)["graph.pt2"]
    size = (entry / "graph.pt2").stat().st_size
    seconds = job.cache.info(entry)["compile_seconds"]
    return GraphRecord(STEP, STEP, job.recipe.shapes.max_seq_len, file, seconds, size, key, hit)


def tracing_model(recipe: Recipe, config: ModelConfig, rank0_shard: Path) -> LlamaModel:
    """Rank 0's model: graphs are the same code on every rank, only the weights differ."""
    state = load_file(rank0_shard)
    tp = TensorParallel(recipe.target.tp_degree, 0)
    kernels, quantization = frozenset(recipe.kernels.enabled), QuantSpec.of(recipe.quantization)
    return model_from_state_dict(config, state, recipe.shapes.max_seq_len, tp, kernels, quantization)


def kernel_profiled_graph(directory: Path, manifest: ArtifactManifest, cache: CompileCache) -> Path:
    """The artifact's step graph compiled again with a profiler scope around each generated kernel
    (`export.KERNEL_PROFILE_CONFIG`), cached beside the graph it was built from."""
    (record,) = manifest.graphs
    key = cache_key({"graph": record.cache_key, "kernel_profile": True})
    entry = cache.lookup("graphs", key)
    if entry is None:
        staging = cache.staging_dir("graphs")
        started = time.perf_counter()
        recipe, graphs = manifest.recipe, GraphSet.from_shapes(manifest.recipe.shapes)
        model = tracing_model(recipe, manifest.model_config, Path(directory) / manifest.weights[0])
        compile_step_graph(model, graphs, staging / "graph.pt2", kernel_profile=True)
        entry = cache.store("graphs", key, staging, {"compile_seconds": round(time.perf_counter() - started, 2)})
    return entry / "graph.pt2"


def _compile_entry(job: CompileJob, key: str) -> Path:
    staging = job.cache.staging_dir("graphs")
    started = time.perf_counter()
    torch.manual_seed(0)
    model = tracing_model(job.recipe, job.config, job.weights_dir / "weights" / "rank0.safetensors")
    compile_step_graph(model, GraphSet.from_shapes(job.recipe.shapes), staging / "graph.pt2")
    return job.cache.store("graphs", key, staging, {"compile_seconds": round(time.perf_counter() - started, 2)})
