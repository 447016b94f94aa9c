"""The one place that turns a recipe's target kind into its backend."""

from __future__ import annotations

import time
from pathlib import Path

from neuron_serve.artifact.manifest import ArtifactManifest, read_manifest, verify_files
from neuron_serve.backends.base import Backend, LoadTimes, Runner
from neuron_serve.backends.cpu.backend import CpuBackend
from neuron_serve.backends.neuron.backend import NeuronBackend

BACKENDS: dict[str, Backend] = {backend.kind: backend for backend in (CpuBackend(), NeuronBackend())}


def backend_for(kind: str) -> Backend:
    if kind not in BACKENDS:
        raise ValueError(f"target.kind {kind!r} has no backend; known: {', '.join(BACKENDS)}")
    return BACKENDS[kind]


def open_runner(directory: Path, times: LoadTimes | None = None) -> tuple[Runner, ArtifactManifest]:
    """Verify an artifact's checksums, then load it with its target's backend."""
    times = times or LoadTimes()
    started = time.perf_counter()
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    times.measure("verify_checksums", started)
    return backend_for(manifest.recipe.target.kind).open_runner(Path(directory), manifest, times), manifest
