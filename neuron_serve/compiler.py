"""`neuron-serve compile RECIPE`: weights -> per-rank shards, one graph per bucket -> artifact directory."""

from __future__ import annotations

import functools
import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from safetensors.torch import load_file, save_file

from neuron_serve.artifacts import ArtifactManifest, GraphRecord, toolchain_versions, write_manifest
from neuron_serve.compile_cache import CompileCache, cache_key, link_or_copy
from neuron_serve.config import ModelConfig
from neuron_serve.graphs import GraphSpec, compile_graph, graph_specs
from neuron_serve.parallel import TensorParallel
from neuron_serve.recipe import Recipe, validate_recipe
from neuron_serve.sharding import shard_state_dict
from neuron_serve.sources import cache_dir, resolve_source
from neuron_serve.weights import load_model_files, model_from_state_dict

WEIGHTS_FORMAT = 1  # bump when the shard layout changes


@dataclass
class CompileResult:
    out_dir: Path
    manifest: ArtifactManifest
    seconds: float


def default_out_dir(recipe: Recipe) -> Path:
    return Path("artifacts") / recipe.name


def compile_recipe(recipe: Recipe, out_dir: Path | None = None, console: Console | None = None) -> CompileResult:
    started = time.perf_counter()
    console = console or Console(stderr=True)
    out_dir = Path(out_dir or default_out_dir(recipe))
    cache = CompileCache(cache_dir())
    source_path = resolve_source(recipe.model.source)
    digest = cache.source_digest(source_path)
    weights_entry = _weights_entry(cache, recipe, digest, console)
    config = ModelConfig.from_dict(cache.info(weights_entry)["model_config"])
    validate_recipe(recipe, config)

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    # Files linked from cache entries keep the digests the cache just verified: hashed once, not twice.
    known_sha256 = cache.checksums(weights_entry)
    for name in known_sha256:
        link_or_copy(weights_entry / name, staging / name)
    weight_files = sorted(name for name in known_sha256 if name.startswith("weights/"))
    graphs = _compile_graphs(cache, recipe, config, weights_entry, staging, console, known_sha256)
    manifest = ArtifactManifest(
        recipe=recipe.to_dict(),
        model_config=config.to_dict(),
        source={"spec": recipe.model.source, "path": str(source_path), "sha256": digest},
        toolchain=toolchain_versions(),
        weights=weight_files,
        graphs=graphs,
    )
    write_manifest(staging, manifest, known_sha256)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return CompileResult(out_dir, manifest, time.perf_counter() - started)


def _weights_entry(cache: CompileCache, recipe: Recipe, digest: str, console: Console) -> Path:
    tp = recipe.target.tp_degree
    key = cache_key(
        {
            "source": digest,
            "dtype": recipe.model.dtype,
            "tp": tp,
            "quant": recipe.quantization.method,
            "format": WEIGHTS_FORMAT,
        }
    )
    entry = cache.lookup("weights", key)
    if entry is not None:
        return entry
    console.print(f"loading weights from {recipe.model.source} and sharding for TP={tp}")
    loaded = load_model_files(recipe.model.source, recipe.model.dtype)
    staging = cache.staging_dir("weights")
    for rank in range(tp):
        shard = shard_state_dict(loaded.config, loaded.state_dict, tp, rank)
        if loaded.config.tie_word_embeddings:
            shard.pop("lm_head.weight", None)  # the embedding itself; re-tied at load
        (staging / "weights").mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in shard.items()}, staging / "weights" / f"rank{rank}.safetensors")
    loaded.tokenizer.save_pretrained(staging / "tokenizer")
    return cache.store("weights", key, staging, {"model_config": loaded.config.to_dict()})


@functools.cache
def traced_code_digest() -> str:
    """The source of everything a graph is traced from: a change to it must miss the cache, even
    before the package version is bumped."""
    import neuron_serve
    import nki_kernels

    package = Path(neuron_serve.__file__).parent
    files = [package / f"{name}.py" for name in ("model", "graphs", "rope", "parallel", "config")]
    files += sorted(Path(nki_kernels.__file__).parent.rglob("*.py"))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def graph_cache_fields(recipe: Recipe, config: ModelConfig, spec: GraphSpec) -> dict:
    shapes = recipe.shapes
    return {
        "graph": spec.name,
        "code": traced_code_digest(),
        "model": config.to_dict(),
        "dtype": recipe.model.dtype,
        "tp": recipe.target.tp_degree,
        "batch_size": shapes.batch_size if spec.kind == "decode" else None,
        "max_seq_len": shapes.max_seq_len,
        "kernels": sorted(recipe.kernels.enabled),
        "quantization": recipe.quantization.method,
        "toolchain": toolchain_versions(),
    }


def _compile_graphs(cache, recipe, config, weights_entry, staging, console, known_sha256) -> list[GraphRecord]:
    if recipe.target.kind == "neuron":
        from neuron_serve.neuron.compile import compile_for_neuron

        return compile_for_neuron(recipe, config, staging)
    if recipe.compiler.cpu_mode == "eager":
        return []
    shapes = recipe.shapes
    specs = graph_specs(shapes.context_buckets, shapes.token_buckets, shapes.max_seq_len)
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
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("graphs", total=len(specs))
        for spec in specs:
            key = cache_key(graph_cache_fields(recipe, config, spec))
            entry = cache.lookup("graphs", key)
            hit = entry is not None
            if not hit:
                progress.update(task, description=f"compiling {spec.name}")
                model = model or _tracing_model(recipe, config, weights_entry)
                entry = _compile_entry(cache, model, spec, shapes.batch_size, key)
            info = cache.info(entry)
            link_or_copy(entry / "graph.pt2", staging / "graphs" / f"{spec.name}.pt2")
            known_sha256[f"graphs/{spec.name}.pt2"] = cache.checksums(entry)["graph.pt2"]
            size = (entry / "graph.pt2").stat().st_size
            records.append(
                GraphRecord(
                    spec.name,
                    spec.kind,
                    spec.bucket,
                    f"graphs/{spec.name}.pt2",
                    info["compile_seconds"],
                    size,
                    key,
                    hit,
                )
            )
            progress.advance(task)
    return records


def _tracing_model(recipe: Recipe, config: ModelConfig, weights_entry: Path):
    """Rank 0's model: graphs are the same code on every rank, only the weights differ."""
    state = load_file(weights_entry / "weights" / "rank0.safetensors")
    tp = TensorParallel(recipe.target.tp_degree, 0)
    kernels = frozenset(recipe.kernels.enabled)
    return model_from_state_dict(config, state, recipe.shapes.max_seq_len, tp, kernels)


def _compile_entry(cache: CompileCache, model, spec: GraphSpec, batch_size: int, key: str) -> Path:
    staging = cache.staging_dir("graphs")
    started = time.perf_counter()
    torch.manual_seed(0)
    compile_graph(model, spec, batch_size, staging / "graph.pt2")
    return cache.store("graphs", key, staging, {"compile_seconds": round(time.perf_counter() - started, 2)})


def summary_table(result: CompileResult) -> Table:
    table = Table(title=f"{result.out_dir}  ({result.seconds:.1f} s)")
    for column in ("graph", "compile s", "size MB", "cache"):
        table.add_column(column, justify="left" if column == "graph" else "right")
    for g in result.manifest.graphs:
        table.add_row(g.name, f"{g.compile_seconds:.1f}", f"{g.size_bytes / 1e6:.1f}", "hit" if g.cache_hit else "miss")
    weights = sum(result.manifest.files[w]["size"] for w in result.manifest.weights)
    table.add_row("weights", "", f"{weights / 1e6:.1f}", "")
    return table
