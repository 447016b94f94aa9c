"""The CPU backend: AOTInductor graphs (or the eager model), TP ranks as processes, CPU sets per replica."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from neuron_serve.artifact.manifest import ArtifactManifest, GraphRecord
from neuron_serve.backends.base import Backend, CompileJob, LoadTimes, Runner, warm_up
from neuron_serve.backends.cpu.compile import compile_cpu_graphs
from neuron_serve.backends.cpu.precision import cpu_dtype, cpu_flags
from neuron_serve.backends.cpu.runners import kernel_profiled_runner, open_rank_runner
from neuron_serve.backends.cpu.tp import TensorParallelRunner
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.kv_cache import KVCache
from neuron_serve.model.parallel import TensorParallel
from neuron_serve.recipe.schema import Recipe


class CpuBackend(Backend):
    kind = "cpu"

    def resolve_dtype(self) -> tuple[str, str]:
        return cpu_dtype(cpu_flags())

    def compile_graphs(self, job: CompileJob) -> list[GraphRecord]:
        return compile_cpu_graphs(job)

    def open_runner(self, directory: Path, manifest: ArtifactManifest, times: LoadTimes) -> Runner:
        if manifest.recipe.target.tp_degree > 1:
            return TensorParallelRunner(directory, manifest, times)
        return open_rank_runner(directory, manifest, 0, times)

    core_name = "CPUs"

    def replica_cores(self, recipe: Recipe, share: int) -> int:
        return share  # TP ranks split the replica's CPUs between them

    def enter_replica(self, first: int, count: int) -> dict[str, str]:
        """Those of this process's CPUs, the torch threads set to match (TP ranks inherit the set)."""
        mine = sorted(os.sched_getaffinity(0))[first : first + count]
        os.sched_setaffinity(0, mine)
        torch.set_num_threads(len(mine))
        env = {"NEURON_SERVE_CPUS": ",".join(map(str, mine))}
        os.environ.update(env)
        return env

    def warm_up(self, runner: Runner) -> None:
        """One prompt step and one decode step. Their first run pays a set-up cost (thread pool,
        allocator, the weights' pages mapped) and, on bf16 activations, the quantized kernels' bf16
        copies of the weights (`kernels/weight_only_linear.cpp`): about 0.3 s for the default model on
        a 2-core Sapphire Rapids, which the first request would otherwise wait for."""
        warm_up(runner, every_graph=False)

    def watch_occupancy(self, set_occupancy: Callable[[float], None]) -> bool:
        return False

    def cores(self, recipe: Recipe) -> int:
        return len(os.sched_getaffinity(0))

    def tp_degrees(self, recipe: Recipe, cores: int) -> tuple[int, ...]:
        return tuple(range(1, cores + 1))

    def kv_cache_short(self, recipe: Recipe, config: ModelConfig, added_slots: int) -> str:
        """Against this host's free memory, as `runners.allocate_cache` judges it when the server starts."""
        kv_heads = TensorParallel(recipe.target.tp_degree).local_kv_heads(config.num_key_value_heads)
        needed = KVCache.nbytes(config, added_slots, recipe.shapes.max_seq_len, kv_heads, recipe.model.torch_dtype)
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if needed <= free:
            return ""
        return f"{added_slots} more slots' KV cache needs {needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB is free"

    def profiling_runner(self, directory: Path, manifest: ArtifactManifest) -> Runner:
        return kernel_profiled_runner(directory, manifest)
