"""The Neuron backend: ModelBuilder graphs, a NeuronCore range per replica, neuron-monitor occupancy."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from neuron_serve.artifact.manifest import ArtifactManifest, GraphRecord
from neuron_serve.backends.base import Backend, CompileJob, LoadTimes, Runner, warm_up
from neuron_serve.backends.neuron.compile import compile_for_neuron
from neuron_serve.backends.neuron.cores import core_range
from neuron_serve.backends.neuron.occupancy import watch_monitor
from neuron_serve.backends.neuron.runner import NeuronRunner
from neuron_serve.model.config import ModelConfig
from neuron_serve.recipe.instances import ALLOWED_TP_DEGREES, INSTANCES
from neuron_serve.recipe.schema import Recipe


class NeuronBackend(Backend):
    kind = "neuron"

    def resolve_dtype(self) -> tuple[str, str]:
        return "bfloat16", "NeuronCore-v2 matmuls run at full rate in bf16"

    def compile_graphs(self, job: CompileJob) -> list[GraphRecord]:
        return compile_for_neuron(job.recipe, job.config, job.staging)

    def open_runner(self, directory: Path, manifest: ArtifactManifest, times: LoadTimes) -> Runner:
        return NeuronRunner(directory, manifest, times)  # NxD runs every rank from this one process

    core_name = "NeuronCores"

    def replica_cores(self, recipe: Recipe, share: int) -> int:
        return recipe.target.tp_degree

    def enter_replica(self, first: int, count: int) -> dict[str, str]:
        """The runtime reads NEURON_RT_VISIBLE_CORES when it starts, which is after this (the runner loads)."""
        env = {"NEURON_RT_VISIBLE_CORES": core_range(first, count)}
        os.environ.update(env)
        return env

    def warm_up(self, runner: Runner) -> None:
        """Every graph once, as NxD Inference warms up before serving: a graph's first run on the
        device can carry set-up of its own."""
        warm_up(runner, every_graph=True)

    def watch_occupancy(self, set_occupancy: Callable[[float], None]) -> bool:
        watch_monitor(set_occupancy, os.environ.get("NEURON_RT_VISIBLE_CORES", "0"))
        return True

    def cores(self, recipe: Recipe) -> int:
        return INSTANCES[recipe.target.instance].neuron_cores

    def tp_degrees(self, recipe: Recipe, cores: int) -> tuple[int, ...]:
        return tuple(d for d in ALLOWED_TP_DEGREES[INSTANCES[recipe.target.instance].family] if d <= cores)

    def kv_cache_short(self, recipe: Recipe, config: ModelConfig, added_slots: int) -> str:
        return ""  # a NeuronCore's memory is the recipe rules' (recipe/memory.py) to judge

    def profiling_runner(self, directory: Path, manifest: ArtifactManifest) -> Runner:
        raise ValueError(
            f"{directory} is a neuron artifact: profile its graphs on the device with neuron-profile and "
            "pass their summaries with --neuron-summaries"
        )
