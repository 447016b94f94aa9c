"""The container's SageMaker contract, checked without a Docker engine: the Dockerfile is parsed, and
its entrypoint script is run as `docker run IMAGE [serve]` would run it, with a stand-in
`neuron-serve` that prints the arguments it was given."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def only(dockerfile, keyword: str) -> str:
    found = [arguments for kw, arguments in dockerfile if kw == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def exec_form(arguments: str) -> list[str]:
    """ENTRYPOINT/CMD must be JSON arrays: the shell form would run under /bin/sh -c, which does not
    pass SageMaker's SIGTERM on to the server."""
    assert arguments.startswith("["), f"not the exec (JSON array) form: {arguments}"
    return json.loads(arguments)


def test_one_neuron_sdk_release_in_the_image_the_extra_and_the_nki_minimum(dockerfile):
    from neuron_serve.backends.neuron.sdk import SDK_PINS, SDK_RELEASE
    from neuron_serve.recipe.files import tomllib
    from nki_kernels.availability import MIN_NKI_VERSION

    default = only(dockerfile, "ARG").removeprefix("BASE_IMAGE=")
    assert default.split(":")[1].split("-")[3] == f"sdk{SDK_RELEASE}"
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["neuron"]
    assert extra == [f"{name}=={version}" for name, version in SDK_PINS.items()]
    assert tuple(int(part) for part in SDK_PINS["nki"].split(".")[:2]) == MIN_NKI_VERSION


def test_the_base_image_is_a_build_argument_defaulting_to_the_neuron_pytorch_inference_dlc(dockerfile):
    (first, arguments), *_ = dockerfile
    assert first == "ARG" and arguments.startswith("BASE_IMAGE=")
    default = arguments.removeprefix("BASE_IMAGE=")
    assert re.fullmatch(r"\S+/pytorch-inference-neuronx:[\d.]+-neuronx-py3\d+-sdk[\d.]+-ubuntu[\d.]+", default)
    assert only(dockerfile, "FROM") in ("${BASE_IMAGE}", "$BASE_IMAGE")


def test_port_8080_is_exposed_and_the_bind_to_port_label_matches_the_entrypoint(dockerfile):
    assert "8080" in only(dockerfile, "EXPOSE").split()
    assert "com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in only(dockerfile, "LABEL")
    assert "SAGEMAKER_BIND_TO_PORT" in entrypoint_script(dockerfile).read_text()


def entrypoint_script(dockerfile) -> Path:
    """The repository file that the ENTRYPOINT runs (copied into the image by a COPY)."""
    (target,) = exec_form(only(dockerfile, "ENTRYPOINT"))
    for keyword, arguments in dockerfile:
        words = [w for w in shlex.split(arguments) if not w.startswith("--")]
        if keyword == "COPY" and words[-1] == target:
            return REPO / words[0]
    raise AssertionError(f"no COPY puts {target} into the image")


@pytest.fixture
def run_container(dockerfile, tmp_path):
    """`docker run IMAGE *args`: ENTRYPOINT + (args or CMD), with `neuron-serve` printing its arguments."""
    script, cmd = entrypoint_script(dockerfile), exec_form(only(dockerfile, "CMD"))
    fake = tmp_path / "bin" / "neuron-serve"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho neuron-serve "$@"\n')
    fake.chmod(0o755)

    def run(*args: str, **env: str) -> str:
        environment = {k: v for k, v in os.environ.items() if k != "SAGEMAKER_BIND_TO_PORT"}
        environment.update(PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}", **env)
        argv = ["sh", str(script), *(args or cmd)]
        return subprocess.run(argv, env=environment, capture_output=True, text=True, check=True).stdout.strip()

    return run


def test_sagemaker_serve_runs_the_server_on_all_interfaces_port_8080(run_container):
    assert run_container("serve") == "neuron-serve serve --host 0.0.0.0 --port 8080"
    assert run_container() == "neuron-serve serve --host 0.0.0.0 --port 8080"  # CMD is `serve`


def test_serve_honours_the_port_sagemaker_assigns_and_extra_arguments(run_container):
    assert run_container("serve", SAGEMAKER_BIND_TO_PORT="9001") == "neuron-serve serve --host 0.0.0.0 --port 9001"
    assert run_container("serve", "--workers", "2").endswith("--port 8080 --workers 2")


def test_other_commands_run_as_given(run_container):
    assert run_container("neuron-serve", "compile", "compile/x.toml") == "neuron-serve compile compile/x.toml"
    assert run_container("echo", "hello") == "hello"


def test_the_install_keeps_the_base_images_neuron_sdk(dockerfile):
    install = next(arguments for keyword, arguments in dockerfile if keyword == "RUN" and "pip install" in arguments)
    assert "--constraint" in install and "torch[-_]neuronx" in install
    assert "import neuron_serve" in install  # a broken install fails the build, not the endpoint
