"""Compile a recipe's graphs for NeuronCores: one ModelBuilder graph per static step shape, into ``graphs/``.

Every graph is traced from the same model code as the CPU graph (the step), built with
neuronx-distributed's parallel layers (``parallel_model.py``) and wrapped in the Neuron calling
convention (``calling_convention.py``). Tracing needs no real weights, so no checkpoint is read here:
the runner gives each rank its shard of the artifact's own ``weights/rank{r}.safetensors`` at load.

ModelBuilder compiles all graphs in one call (neuronx-cc runs them in parallel threads) into one
``graphs/nxd_model.pt``: every GraphRecord names that file, its size is its own NEFF's, and its
compile time is an equal share of the whole (the compiler does not report per-graph times).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from neuron_serve.artifact.graphs import STEP, GraphSet
from neuron_serve.artifact.manifest import GraphRecord
from neuron_serve.backends.neuron import sdk
from neuron_serve.backends.neuron.calling_convention import NeuronStep, example_inputs, graph_name
from neuron_serve.backends.neuron.parallel_model import LayerFactory, build_parallel_model
from neuron_serve.backends.neuron.runner import GRAPHS_DIR
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.quantization import QuantSpec
from neuron_serve.progress import Phase
from neuron_serve.recipe.schema import Recipe
from neuron_serve.weights.local_cache import shared_cache_url


def recipe_graphs(recipe: Recipe) -> GraphSet:
    """The graph set a neuron recipe compiles: static, one graph per shape."""
    return GraphSet.from_shapes(recipe.shapes, static=True)


def graph_factory(
    recipe: Recipe, config: ModelConfig, column_cls: LayerFactory | None = None, row_cls: LayerFactory | None = None
) -> Callable[[], NeuronStep]:
    """``factory()`` builds one graph's module (every graph's is the same; the shapes differ). ModelBuilder
    calls it inside its mocked TP world, where the default (neuronx-distributed) layers find their TP size."""
    shapes, dtype, kernels = recipe.shapes, recipe.model.torch_dtype, frozenset(recipe.kernels.enabled)
    quantization = QuantSpec.of(recipe.quantization)

    def factory() -> NeuronStep:
        degree = recipe.target.tp_degree
        model = build_parallel_model(
            config, shapes.max_seq_len, degree, dtype, column_cls, row_cls, kernels, quantization
        )
        return NeuronStep(model, shapes.batch_size)

    return factory


def share_compiler_cache() -> None:
    """With a shared neuron-serve cache on S3, neuronx-cc's persistent cache lives beside it. The Neuron
    SDK reads NEURON_COMPILE_CACHE_URL (a directory or an s3:// URL; "Neuron Persistent Cache",
    about-neuron/arch/neuron-features/neuron-caching.rst, SDK 2.29 docs); one the user set wins."""
    shared = shared_cache_url()
    if shared:
        os.environ.setdefault("NEURON_COMPILE_CACHE_URL", shared.rstrip("/") + "/neuronx-cc")


def compile_for_neuron(recipe: Recipe, config: ModelConfig, staging: Path) -> list[GraphRecord]:
    """Compile every graph of ``recipe`` into ``staging/graphs/``; one GraphRecord per graph.

    neuronx-cc's work directory is kept beside ``staging`` when the compile fails (its logs say why)
    and removed when it succeeds.
    """
    sdk.require_sdk()
    share_compiler_cache()
    inputs = example_inputs(recipe_graphs(recipe))
    out_dir = Path(staging) / GRAPHS_DIR
    workdir = Path(staging).with_name(Path(staging).name + ".neuronx-cc")
    started = time.perf_counter()
    # ModelBuilder compiles every graph in one call: no count to report, only the time it takes.
    with Phase(f"compile {recipe.name}: {len(inputs)} graphs in one ModelBuilder call (neuronx-cc)"):
        model_file = sdk.compile_graphs(recipe, graph_factory(recipe, config), inputs, None, out_dir, workdir)
    seconds = (time.perf_counter() - started) / len(inputs)
    bundle, file = model_file.stat().st_size, model_file.relative_to(staging).as_posix()
    records = []
    for shape in recipe_graphs(recipe).compiled_shapes():
        name = graph_name(shape)
        neff = workdir / name / "_tp0_bk0" / "graph.neff"
        size = neff.stat().st_size if neff.exists() else bundle // len(inputs)
        # No compile-cache entry: the bundle holds every graph, so one changed shape recompiles all.
        records.append(GraphRecord(name, STEP, shape.kv_len, file, round(seconds, 2), size, "", False))
    shutil.rmtree(workdir, ignore_errors=True)
    return records
