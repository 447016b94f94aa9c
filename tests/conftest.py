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
    from neuron_serve.weights.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_loaded(tiny_dir):
    from neuron_serve.weights.loader import load_model_files

    return load_model_files(str(tiny_dir))


@pytest.fixture(scope="session")
def default_loaded():
    from neuron_serve.weights.loader import load_model_files

    return load_model_files("default")


REPO = Path(__file__).resolve().parent.parent


def eager_runner(model, slots: int, context_buckets: list[int], token_buckets: list[int], **graph_set):
    """The eager model as a runner over a graph set of these buckets (and `batch_buckets`, `token_budget`)."""
    from neuron_serve.artifact.graphs import GraphSet
    from neuron_serve.backends.cpu.runners import EagerRunner

    if "batch_buckets" in graph_set:
        graph_set["batch_buckets"] = tuple(graph_set["batch_buckets"])
    return EagerRunner(
        model, GraphSet(slots, model.max_seq_len, tuple(context_buckets), tuple(token_buckets), **graph_set)
    )


def tiny_recipe(**changes):
    """compile/tiny-cpu.toml with `section.field=value` changes, e.g. tiny_recipe(**{"shapes.batch_size": 2})."""
    import dataclasses

    from neuron_serve.recipe.files import load_recipe

    recipe = load_recipe(REPO / "compile" / "tiny-cpu.toml")
    for dotted, value in changes.items():
        section, name = dotted.split(".")
        recipe = dataclasses.replace(
            recipe, **{section: dataclasses.replace(getattr(recipe, section), **{name: value})}
        )
    return recipe


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_dir) -> Path:
    """The tiny recipe compiled once per session (AOT graphs for every bucket)."""
    from neuron_serve.compiler.compile import compile_recipe

    return compile_recipe(tiny_recipe(), tmp_path_factory.mktemp("artifacts") / "tiny-cpu").out_dir


@pytest.fixture(scope="session")
def tiny_server(tiny_artifacts):
    from server_handle import ServerHandle

    server = ServerHandle(tiny_artifacts, "--max-waiting", "128")
    yield server
    server.stop()


def wait_finished(sequences, reason: str = "length", timeout: float = 60) -> None:
    """Wait for each request's last event and check why it ended."""
    from neuron_serve.engine.sequence import Finished

    for seq in sequences:
        while not isinstance(event := seq.events.get(timeout=timeout), Finished):
            pass
        assert event.reason == reason, event


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A new bucket on the session's S3 server, with boto3 (here and in child processes) pointed at it."""
    import uuid

    import boto3

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket
