"""`neuron-serve compile RECIPE`: weights -> per-rank shards, the graph set -> an artifact directory.

The weight shards are the compile cache's (keyed by the source's bytes, the dtype, the TP degree and
the quantization); the graphs are the backend's (`Backend.compile_graphs`). Files come into the
artifact as hard links from the cache, and the manifest is written last, so a reader never sees
half an artifact.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from neuron_serve.artifact.compile_cache import CompileCache, cache_key, link_or_copy, open_compile_cache
from neuron_serve.artifact.manifest import ArtifactManifest, kv_cache_bytes, toolchain_versions, write_manifest
from neuron_serve.backends.base import CompileJob
from neuron_serve.backends.registry import backend_for
from neuron_serve.compiler.quality import evaluate
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.quantization import QuantSpec, quantize_state_dict
from neuron_serve.model.state import stored_shard
from neuron_serve.progress import Phase
from neuron_serve.recipe.schema import AUTO_DTYPE, Recipe
from neuron_serve.recipe.validation import validate_recipe
from neuron_serve.weights.loader import load_model_files
from neuron_serve.weights.sources import resolve_source

WEIGHTS_FORMAT = 1  # bump when the shard layout changes


@dataclass
class CompileResult:
    out_dir: Path
    manifest: ArtifactManifest
    seconds: float


def default_out_dir(recipe: Recipe) -> Path:
    return Path("artifacts") / recipe.name


def resolve_precision(recipe: Recipe, console: Console) -> Recipe:
    """The recipe with ``model.dtype = "auto"`` replaced by the target's choice, which the manifest keeps."""
    if recipe.model.dtype != AUTO_DTYPE:
        return recipe
    dtype, why = backend_for(recipe.target.kind).resolve_dtype()
    console.print(f"precision: {dtype} ({why})")
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype=dtype))


def compile_recipe(recipe: Recipe, out_dir: Path | None = None, console: Console | None = None) -> CompileResult:
    started = time.perf_counter()
    console = console or Console(stderr=True)
    recipe = resolve_precision(recipe, console)
    out_dir = Path(out_dir or default_out_dir(recipe))
    cache = open_compile_cache()
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
    job = CompileJob(recipe, config, weights_entry, staging, cache, console, known_sha256)
    graphs = backend_for(recipe.target.kind).compile_graphs(job)  # it reports its own progress
    manifest = ArtifactManifest(
        recipe=recipe,
        model_config=config,
        source={"spec": recipe.model.source, "path": str(source_path), "sha256": digest},
        toolchain=toolchain_versions(),
        weights=weight_files,
        graphs=graphs,
        quality=cache.info(weights_entry).get("quality", []),
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
            "quant": dataclasses.asdict(recipe.quantization),
            "format": WEIGHTS_FORMAT,
        }
    )
    entry = cache.lookup("weights", key)
    if entry is not None:
        return entry
    title = f"compile {recipe.name}: "
    with Phase(f"{title}loading the weights from {recipe.model.source}", console=console):
        loaded = load_model_files(recipe.model.source, recipe.model.torch_dtype)
    quantization = QuantSpec.of(recipe.quantization)
    kept = loaded.kept_quantization(quantization)
    if kept:
        console.print(f"{len(kept)} layers keep the source's own int4 codes")
    work = f"sharding for TP={tp}"
    if quantization.enabled:
        work = f"quantizing to {quantization.method} (skipping {', '.join(quantization.skip)}), {work}"
    staging = cache.staging_dir("weights")
    (staging / "weights").mkdir()
    with Phase(title + work, console=console):
        state = quantize_state_dict(loaded.state_dict, quantization, kept)
        for rank in range(tp):
            save_file(stored_shard(loaded.config, state, tp, rank), staging / "weights" / f"rank{rank}.safetensors")
    loaded.tokenizer.save_pretrained(staging / "tokenizer")
    info = {"model_config": loaded.config.to_dict()}
    if quantization.enabled:
        with Phase(f"{title}measuring {quantization.method}'s quality against the unquantized model", console=console):
            info["quality"] = [row.to_dict() for row in evaluate(loaded, [quantization])]
    return cache.store("weights", key, staging, info)


def summary_table(result: CompileResult) -> Table:
    table = Table(title=f"{result.out_dir}  ({result.seconds:.1f} s)")
    for column in ("graph", "compile s", "size MB", "cache"):
        table.add_column(column, justify="left" if column == "graph" else "right")
    for g in result.manifest.graphs:
        table.add_row(g.name, f"{g.compile_seconds:.1f}", f"{g.size_bytes / 1e6:.1f}", "hit" if g.cache_hit else "miss")
    weights = sum(result.manifest.files[w]["size"] for w in result.manifest.weights)
    table.add_row("weights", "", f"{weights / 1e6:.1f}", "")
    table.add_row("KV cache (allocated at load)", "", f"{kv_cache_bytes(result.manifest) / 1e6:.1f}", "")
    return table


def quality_table(rows: list[dict]) -> Table:
    """`Quality` rows: perplexity on held-out text and greedy agreement, against the unquantized model."""
    table = Table(title="quantization quality (held-out text; greedy tokens of the unquantized model)")
    for column in ("method", "perplexity", "increase", "greedy agreement"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        increase = f"{row['perplexity_increase']:+.2%}"
        table.add_row(row["method"], f"{row['perplexity']:.3f}", increase, f"{row['greedy_agreement']:.1%}")
    return table
