"""Shared fixtures. The tiny model is written once per session into a temporary cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Every test session gets its own NEURON_SERVE_CACHE, so no test depends on this machine's."""
    cache = tmp_path_factory.mktemp("neuron-serve-cache")
    os.environ["NEURON_SERVE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_dir(isolated_cache) -> Path:
    from neuron_serve.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_loaded(tiny_dir):
    from neuron_serve.weights import load_model_files

    return load_model_files(str(tiny_dir))


@pytest.fixture(scope="session")
def default_loaded():
    from neuron_serve.weights import load_model_files

    return load_model_files("default")
