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


REPO = Path(__file__).resolve().parent.parent


def tiny_recipe(**changes):
    """compile/tiny-cpu.toml with `section.field=value` changes, e.g. tiny_recipe(**{"shapes.batch_size": 2})."""
    import dataclasses

    from neuron_serve.recipe import load_recipe

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
    from neuron_serve.compiler import compile_recipe

    return compile_recipe(tiny_recipe(), tmp_path_factory.mktemp("artifacts") / "tiny-cpu").out_dir


class ServerHandle:
    """A real `neuron-serve serve` (gunicorn) on 127.0.0.1, in its own process."""

    def __init__(self, artifacts: Path, *extra: str):
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.artifacts = artifacts
        self.model = "tiny-cpu"
        command = [
            sys.executable,
            "-m",
            "neuron_serve.cli",
            "serve",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *extra,
        ]
        self.log = open(artifacts.parent / f"server-{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        import time

        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited: {self.logs()}"
            try:
                if requests.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy loading
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready: {self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        import requests
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(f"{self.base_url}/metrics", timeout=5).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="session")
def tiny_server(tiny_artifacts):
    server = ServerHandle(tiny_artifacts, "--max-waiting", "128")
    yield server
    server.stop()
