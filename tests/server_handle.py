"""A real `neuron-serve serve` (gunicorn) on 127.0.0.1 in its own process, for the tests and the
benchmarks that need one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from neuron_serve.artifact.manifest import read_manifest


class ServerHandle:
    """Serves `artifacts` on a free port; its log and its traffic profiles (`profile_dir`) go next to
    the artifacts. `model` is the name it serves under (the recipe's). `targets` replaces what is
    served (S3 URLs, several models, or none for SageMaker's way); `env` is added to the environment."""

    def __init__(
        self,
        artifacts: Path,
        *extra: str,
        ready_timeout: float = 120,
        targets: list[str] | None = None,
        env: dict[str, str] | None = None,
        port_option: bool = True,
    ):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.artifacts = artifacts
        self.model = read_manifest(artifacts).recipe.name
        self.profile_dir = artifacts.parent / f"profiles-{self.port}"
        command = [
            sys.executable,
            "-m",
            "neuron_serve.cli",
            "serve",
            *(targets if targets is not None else [str(artifacts)]),
            "--host",
            "127.0.0.1",
            *(["--port", str(self.port)] if port_option else []),
            "--profile-dir",
            str(self.profile_dir),
            *extra,
        ]
        environment = {**os.environ, **(env or {})}
        if not port_option:
            environment["SAGEMAKER_BIND_TO_PORT"] = str(self.port)
        self.log = open(artifacts.parent / f"server-{self.port}.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=environment)
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.logs()}")
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


def child_pids(pid: int) -> list[int]:
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]


def forward_process_pids(server_pid: int, count: int = 1, timeout: float = 30) -> list[int]:
    """The forward processes under a server: its workers' children, but for multiprocessing's resource
    tracker; waits until there are `count`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        grandchildren = [c for worker in child_pids(server_pid) for c in child_pids(worker)]
        forwards = [c for c in grandchildren if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
        if len(forwards) >= count:
            return forwards
        time.sleep(0.1)
    raise TimeoutError(f"fewer than {count} forward processes under the server")
