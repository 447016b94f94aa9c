"""The cpu image, built and run as a user would: `docker build --build-arg FLAVOUR=cpu`, then `docker run`
with nothing but a published port, then /ping, a chat completion and SageMaker's /invocations.

Slow: the build compiles the default model (minutes). Where no Docker engine answers `docker info`, the
test is skipped with the reason (see it with `pytest -m slow -rs tests/test_container.py`);
tests/test_dockerfile.py checks the same contract without Docker.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
IMAGE = "neuron-serve:cpu-test"
MODEL = "smollm2-135m-cpu"


def docker_unavailable() -> str:
    """Why no container can run here; "" when one can."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker command on PATH"
    try:
        info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 60 s"
    if info.returncode != 0:
        said = (info.stderr.strip().splitlines() or ["no message"])[-1]
        return f"no Docker engine answers `docker info`: {said}"
    return ""


@pytest.fixture(scope="module")
def cpu_image() -> str:
    reason = docker_unavailable()
    if reason:
        pytest.skip(reason)
    build = ["docker", "build", "--build-arg", "FLAVOUR=cpu", "--tag", IMAGE, str(REPO)]
    subprocess.run(build, check=True, timeout=3600)
    return IMAGE


@pytest.fixture(scope="module")
def container(cpu_image):
    """`docker run -p PORT:8080 neuron-serve:cpu`, on a free host port; the base URL once /ping answers."""
    name = f"neuron-serve-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "--detach", "--name", name, "-p", "127.0.0.1::8080", cpu_image], check=True)
    try:
        published = subprocess.run(["docker", "port", name, "8080"], capture_output=True, text=True, check=True)
        url = "http://" + published.stdout.split()[0]
        _wait_for_ping(url, name)
        yield url
    finally:
        subprocess.run(["docker", "rm", "--force", name], capture_output=True)


def _wait_for_ping(url: str, name: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        state = ["docker", "inspect", "--format", "{{.State.Running}}", name]
        if subprocess.run(state, capture_output=True, text=True).stdout.strip() != "true":
            break
        time.sleep(2)
    logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
    pytest.fail(f"the container never answered /ping:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")


def test_the_cpu_image_serves_the_default_model_with_no_configuration(container):
    assert requests.get(f"{container}/ping", timeout=5).status_code == 200
    chat = requests.post(
        f"{container}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24,
            "temperature": 0,
        },
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    assert "Paris" in chat.json()["choices"][0]["message"]["content"]
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}}
    invocation = requests.post(f"{container}/invocations", json=body, timeout=120)
    assert invocation.status_code == 200 and "Paris" in invocation.json()["generated_text"], invocation.text
