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

from neuron_serve.artifact.compile_cache import cache_key, link_or_copy
from neuron_serve.artifact.graphs import STEP, GraphSet
from neuron_serve.artifact.manifest import GraphRecord, toolchain_versions
from neuron_serve.backends.base import CompileJob
from neuron_serve.backends.cpu.export import compile_step_graph
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.parallel import TensorParallel
from neuron_serve.model.quantization import QuantSpec
from neuron_serve.model.state import model_from_state_dict


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
        with job.console.status(f"compiling the {STEP} graph (torch.export + AOTInductor)"):
            entry = _compile_entry(job, key)
    return [_link_graph(job, entry, key, hit)]


def _link_graph(job: CompileJob, entry: Path, key: str, hit: bool) -> GraphRecord:
    file = f"graphs/{STEP}.pt2"
    link_or_copy(entry / "graph.pt2", job.staging / file)
    job.known_sha256[file] = job.cache.checksums(entry)["graph.pt2"]
    size = (entry / "graph.pt2").stat().st_size
    seconds = job.cache.info(entry)["compile_seconds"]
    return GraphRecord(STEP, STEP, job.recipe.shapes.max_seq_len, file, seconds, size, key, hit)


def tracing_model(job: CompileJob) -> LlamaModel:
    """Rank 0's model: graphs are the same code on every rank, only the weights differ."""
    recipe = job.recipe
    state = load_file(job.weights_dir / "weights" / "rank0.safetensors")
    tp = TensorParallel(recipe.target.tp_degree, 0)
    kernels, quantization = frozenset(recipe.kernels.enabled), QuantSpec.of(recipe.quantization)
    return model_from_state_dict(job.config, state, recipe.shapes.max_seq_len, tp, kernels, quantization)


def _compile_entry(job: CompileJob, key: str) -> Path:
    staging = job.cache.staging_dir("graphs")
    started = time.perf_counter()
    torch.manual_seed(0)
    compile_step_graph(tracing_model(job), GraphSet.from_shapes(job.recipe.shapes), staging / "graph.pt2")
    return job.cache.store("graphs", key, staging, {"compile_seconds": round(time.perf_counter() - started, 2)})
