"""The seam between the stages and the hardware: what a backend does, and what a runner offers.

A backend (cpu, neuron) compiles a recipe's graph set, opens a runner on an artifact, places a
replica on its share of the machine, warms a runner up and says where accelerator occupancy comes
from. `backends.registry.backend_for(kind)` picks one; outside `backends/`, only the recipe's
validation (each target's own fields) looks at the target kind.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console

from neuron_serve.artifact.compile_cache import CompileCache
from neuron_serve.artifact.graphs import GraphSet, GraphUse
from neuron_serve.artifact.manifest import ArtifactManifest, GraphRecord
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.step import PromptChunk, StepBatch
from neuron_serve.recipe.schema import Recipe


@dataclass
class LoadTimes:
    """Cold-start phases in seconds, for the metrics and the benchmark."""

    phases: dict[str, float] = field(default_factory=dict)

    def measure(self, phase: str, started: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - started


@dataclass
class Forward:
    """A step's result: logits [decode slots + chunks, vocab], one row per decode slot then one per
    prompt chunk (after its last token), in the batch's order; and the graph calls it made."""

    logits: torch.Tensor
    uses: list[GraphUse]


class Runner(Protocol):
    """One replica's graphs and KV cache, as the engine drives them."""

    graphs: GraphSet

    def step(self, batch: StepBatch) -> Forward:
        """Run one engine step: store its keys and values in the cache, return its logits."""
        ...

    def close(self) -> None: ...


def run_prompt(runner: Runner, prompt: list[int], slot: int) -> torch.Tensor:
    """Fill `slot` with a whole prompt, in steps of the graph set's prompt budget; the logits [vocab]
    after its last token. For warm-up and tests: the engine interleaves prompts with decodes."""
    runner.graphs.check_prompt(prompt)
    budget = runner.graphs.prompt_budget(0)
    for start in range(0, len(prompt), budget):
        forward = runner.step(StepBatch(chunks=[PromptChunk(slot, start, prompt[start : start + budget])]))
    return forward.logits[0]


def run_decode(runner: Runner, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
    """One decode token for each of `slots`; logits [len(slots), vocab]."""
    return runner.step(StepBatch(list(slots), list(tokens), list(positions))).logits


def warm_up(runner: Runner, every_graph: bool) -> None:
    """Run the first steps, so that the first requests are as fast as the later ones: every compiled
    graph once (`every_graph`), or one prompt step and one decode step (`GraphSet.warm_up_batches`)."""
    for batch in runner.graphs.warm_up_batches(every_graph):
        runner.step(batch)


@dataclass
class CompileJob:
    """What a backend compiles from: the recipe, the model, this compile's weight shards
    (``weights/rank{r}.safetensors`` below `weights_dir`), and where the graphs go."""

    recipe: Recipe
    config: ModelConfig
    weights_dir: Path
    staging: Path
    cache: CompileCache
    console: Console
    known_sha256: dict[str, str]  # digests of files linked into `staging`, filled in as graphs land


@dataclass(frozen=True)
class Cores:
    """A replica's cores: `count` of them from index `first` of those `Backend.cores` counts."""

    first: int
    count: int


class Backend(ABC):
    kind: str

    @abstractmethod
    def resolve_dtype(self) -> tuple[str, str]:
        """(dtype, why): what a recipe's ``model.dtype = "auto"`` compiles to on this target."""

    @abstractmethod
    def compile_graphs(self, job: CompileJob) -> list[GraphRecord]:
        """Compile the recipe's `GraphSet` into ``job.staging``; one record per graph."""

    @abstractmethod
    def open_runner(self, directory: Path, manifest: ArtifactManifest, times: LoadTimes) -> Runner:
        """Load a verified artifact into a runner on this process's share of the machine."""

    core_name: str  # what `cores` counts, for messages

    @abstractmethod
    def replica_cores(self, recipe: Recipe, share: int) -> int:
        """The cores one replica takes, where an equal split of the host would give each `share`."""

    @abstractmethod
    def enter_replica(self, first: int, count: int) -> dict[str, str]:
        """Confine this process (a replica's forward process, before it loads) to cores first ..
        first + count - 1 of those `cores` counts; returns the environment it set, for the log."""

    @abstractmethod
    def warm_up(self, runner: Runner) -> None:
        """Run what the first requests would otherwise pay for."""

    @abstractmethod
    def watch_occupancy(self, set_occupancy: Callable[[float], None]) -> bool:
        """Start reporting accelerator occupancy from the device; False when the engine's forward
        time is the measure instead."""

    @abstractmethod
    def cores(self, recipe: Recipe) -> int:
        """The cores a deployment of `recipe` splits between its replicas' TP ranks."""

    @abstractmethod
    def tp_degrees(self, recipe: Recipe, cores: int) -> tuple[int, ...]:
        """The TP degrees this target can run the recipe at on `cores` (heads aside), increasing."""

    @abstractmethod
    def kv_cache_short(self, recipe: Recipe, config: ModelConfig, added_slots: int) -> str:
        """Why `added_slots` more slots' KV cache would not fit, beyond what the recipe rules judge
        ("" when it would)."""

    @abstractmethod
    def profiling_runner(self, directory: Path, manifest: ArtifactManifest) -> Runner:
        """A runner of the artifact whose operators `torch.profiler` sees, for `neuron-serve profile`."""
