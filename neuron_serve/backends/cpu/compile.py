"""Compile a recipe's graph set for the CPU: each graph on its own, each looked up in the compile
cache first (a graph depends on the model's architecture, not its weight values)."""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file

from neuron_serve.artifact.compile_cache import CompileCache, cache_key, link_or_copy
from neuron_serve.artifact.graphs import DECODE, GraphSet, GraphSpec
from neuron_serve.artifact.manifest import GraphRecord, toolchain_versions
from neuron_serve.backends.base import CompileJob
from neuron_serve.backends.cpu.export import compile_graph
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.parallel import TensorParallel
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


def graph_cache_fields(job: CompileJob, spec: GraphSpec) -> dict:
    recipe, shapes = job.recipe, job.recipe.shapes
    return {
        "graph": spec.name,
        "code": traced_code_digest(),
        "model": job.config.to_dict(),
        "dtype": recipe.model.dtype,
        "tp": recipe.target.tp_degree,
        "batch_size": shapes.batch_size if spec.kind == DECODE else None,
        "max_seq_len": shapes.max_seq_len,
        "kernels": sorted(recipe.kernels.enabled),
        "quantization": recipe.quantization.method,
        "toolchain": toolchain_versions(),
    }


def compile_cpu_graphs(job: CompileJob) -> list[GraphRecord]:
    if job.recipe.compiler.cpu_mode == "eager":
        return []
    specs = GraphSet.from_shapes(job.recipe.shapes).specs()
    model = None
    records = []
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=job.console, transient=True) as progress:
        task = progress.add_task("graphs", total=len(specs))
        for spec in specs:
            key = cache_key(graph_cache_fields(job, spec))
            entry = job.cache.lookup("graphs", key)
            hit = entry is not None
            if not hit:
                progress.update(task, description=f"compiling {spec.name}")
                model = model or tracing_model(job)
                entry = _compile_entry(job.cache, model, spec, job.recipe.shapes.batch_size, key)
            records.append(_link_graph(job, spec, entry, key, hit))
            progress.advance(task)
    return records


def _link_graph(job: CompileJob, spec: GraphSpec, entry: Path, key: str, hit: bool) -> GraphRecord:
    file = f"graphs/{spec.name}.pt2"
    link_or_copy(entry / "graph.pt2", job.staging / file)
    job.known_sha256[file] = job.cache.checksums(entry)["graph.pt2"]
    size = (entry / "graph.pt2").stat().st_size
    seconds = job.cache.info(entry)["compile_seconds"]
    return GraphRecord(spec.name, spec.kind, spec.bucket, file, seconds, size, key, hit)


def tracing_model(job: CompileJob) -> LlamaModel:
    """Rank 0's model: graphs are the same code on every rank, only the weights differ."""
    recipe = job.recipe
    state = load_file(job.weights_dir / "weights" / "rank0.safetensors")
    tp = TensorParallel(recipe.target.tp_degree, 0)
    return model_from_state_dict(job.config, state, recipe.shapes.max_seq_len, tp, frozenset(recipe.kernels.enabled))


def _compile_entry(cache: CompileCache, model: LlamaModel, spec: GraphSpec, batch_size: int, key: str) -> Path:
    staging = cache.staging_dir("graphs")
    started = time.perf_counter()
    torch.manual_seed(0)
    compile_graph(model, spec, batch_size, staging / "graph.pt2")
    return cache.store("graphs", key, staging, {"compile_seconds": round(time.perf_counter() - started, 2)})
