"""`NeuronRunner`: the compiled Neuron step graphs of an artifact, on this process's NeuronCores.

One replica is one process whose NeuronCores are named by ``NEURON_RT_VISIBLE_CORES`` (one core
per TP rank, set by the server for each worker). The graphs are loaded with `sdk.load_compiled`,
each rank given its shard of the artifact's own weights (``weights/rank{r}.safetensors``); the KV
cache is the graphs' device state (``calling_convention.py``), so a step sends token ids,
positions and its mask, and gets its logits back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.artifact.manifest import ArtifactManifest
from neuron_serve.backends.base import Forward, LoadTimes
from neuron_serve.backends.neuron import sdk
from neuron_serve.backends.neuron.calling_convention import rank_weights, step_inputs
from neuron_serve.backends.neuron.cores import visible_core_count
from neuron_serve.model.step import StepBatch, logit_rows

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


class NeuronRunner:
    """Runs each engine step as one call of the step graph of its static shape."""

    def __init__(self, directory: Path, manifest: ArtifactManifest, times: LoadTimes, load: GraphLoader | None = None):
        recipe, config = manifest.recipe, manifest.model_config
        degree = recipe.target.tp_degree
        self.graphs = GraphSet.from_shapes(recipe.shapes, static=True)
        check_visible_cores(degree)
        started = time.perf_counter()
        shards = [load_file(Path(directory) / name) for name in manifest.weights]
        weights = rank_weights(shards, config, self.graphs.max_seq_len)
        load = load or sdk.load_compiled
        self.model = load(Path(directory) / GRAPHS_DIR, degree, weights=weights)
        times.measure("load_graphs", started)

    def step(self, batch: StepBatch) -> Forward:
        shape, uses = self.graphs.step_shape(batch)
        logits = self.model(*step_inputs(batch, shape, self.graphs.batch_size))
        return Forward(logits[logit_rows(batch, shape)], uses)

    def close(self) -> None:
        """Nothing to release: the runtime frees the cores and their states with the process."""
