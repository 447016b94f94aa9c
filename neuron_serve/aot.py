"""Runners over an artifact directory: AOTInductor graphs (or the eager model) on one rank."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from neuron_serve.artifacts import ArtifactManifest, read_manifest, verify_files
from neuron_serve.config import ModelConfig
from neuron_serve.graphs import constants_map
from neuron_serve.parallel import TensorParallel
from neuron_serve.rope import rope_tables
from neuron_serve.runner import EagerRunner, Runner
from neuron_serve.weights import model_from_state_dict


@dataclass
class LoadTimes:
    """Cold-start phases in seconds, for the metrics and the benchmark."""

    phases: dict[str, float] = field(default_factory=dict)

    def measure(self, phase: str, started: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - started


def rank_weights(directory: Path, manifest: ArtifactManifest, rank: int) -> dict[str, torch.Tensor]:
    config = ModelConfig.from_dict(manifest.model_config)
    state = load_file(Path(directory) / manifest.weights[rank])
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    state["rope_cos"], state["rope_sin"] = rope_tables(config, manifest.recipe["shapes"]["max_seq_len"])
    return state


class AOTRunner(Runner):
    """Calls the compiled graphs; every graph shares the one copy of this rank's weights."""

    def __init__(self, directory: Path, manifest: ArtifactManifest, rank: int, times: LoadTimes):
        shapes = manifest.recipe["shapes"]
        super().__init__(
            shapes["batch_size"], shapes["max_seq_len"], shapes["context_buckets"], shapes["token_buckets"]
        )
        started = time.perf_counter()
        self.weights = rank_weights(directory, manifest, rank)
        self.graphs = {}
        for record in manifest.graphs:
            package = torch._inductor.aoti_load_package(str(Path(directory) / record.file))
            package.load_constants(constants_map(package, self.weights), check_full_update=True, user_managed=True)
            self.graphs[record.name] = package
        times.measure("load_graphs", started)
        self.k_cache, self.v_cache = new_kv_cache(manifest, self.weights)

    def run_prefill(self, bucket, tokens, last_index):
        return self.graphs[f"prefill_{bucket}"](tokens, last_index)

    def run_prefill_chunk(self, tokens, start, last_index, slot):
        graph = self.graphs[f"prefill_chunk_{self.context_buckets[-1]}"]
        return graph(tokens, start, last_index, self.k_cache[:, slot], self.v_cache[:, slot])

    def run_decode(self, kv_len, tokens, positions):
        return self.graphs[f"decode_{kv_len}"](tokens, positions, self.k_cache, self.v_cache)


def new_kv_cache(manifest: ArtifactManifest, weights: dict[str, torch.Tensor]):
    config = ModelConfig.from_dict(manifest.model_config)
    shapes = manifest.recipe["shapes"]
    local_kv_heads = weights["layers.0.self_attn.k_proj.weight"].shape[0] // config.head_dim
    shape = (config.num_hidden_layers, shapes["batch_size"], local_kv_heads, shapes["max_seq_len"], config.head_dim)
    dtype = weights["embed_tokens.weight"].dtype
    return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)


def open_rank_runner(directory: Path, manifest: ArtifactManifest, rank: int, times: LoadTimes) -> Runner:
    """This rank's runner: the AOT graphs, or the eager model when the recipe compiled none."""
    if manifest.graphs:
        return AOTRunner(directory, manifest, rank, times)
    started = time.perf_counter()
    shapes = manifest.recipe["shapes"]
    tp = TensorParallel(manifest.recipe["target"]["tp_degree"], rank)
    config = ModelConfig.from_dict(manifest.model_config)
    kernels = frozenset(manifest.recipe["kernels"]["enabled"])
    model = model_from_state_dict(config, rank_weights(directory, manifest, rank), shapes["max_seq_len"], tp, kernels)
    times.measure("load_graphs", started)
    return EagerRunner(model, shapes["batch_size"], shapes["context_buckets"], shapes["token_buckets"])


def open_runner(directory: str | Path, times: LoadTimes | None = None) -> tuple[Runner, ArtifactManifest]:
    """Verify the artifact's checksums, then load it: one process, or one per TP rank."""
    directory = Path(directory)
    times = times or LoadTimes()
    started = time.perf_counter()
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    times.measure("verify_checksums", started)
    if manifest.recipe["target"]["kind"] == "neuron":  # NxD runs every rank from this one process
        from neuron_serve.neuron.runner import NeuronRunner

        return NeuronRunner(directory, manifest, times), manifest
    if manifest.recipe["target"]["tp_degree"] > 1:
        from neuron_serve.tp import TensorParallelRunner

        return TensorParallelRunner(directory, manifest, times), manifest
    return open_rank_runner(directory, manifest, 0, times), manifest
