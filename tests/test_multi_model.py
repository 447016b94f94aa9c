"""Several models on one server: each answers under its own name, with replicas on cores of its own."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import requests
from conftest import tiny_recipe
from openai import NotFoundError, OpenAI
from server_handle import ServerHandle, forward_process_pids

from neuron_serve.compiler.compile import compile_recipe


@pytest.fixture(scope="module")
def two_models(tiny_artifacts, tmp_path_factory):
    """The tiny model served twice, as tiny-cpu and tiny-b (a second artifact: compile-cache hits)."""
    second = compile_recipe(dataclasses.replace(tiny_recipe(), name="tiny-b"), tmp_path_factory.mktemp("b") / "tiny-b")
    server = ServerHandle(tiny_artifacts, targets=[str(tiny_artifacts), str(second.out_dir)])
    yield server
    server.stop()


def test_each_model_answers_under_its_own_name(two_models):
    client = OpenAI(base_url=f"{two_models.base_url}/v1", api_key="unused")
    for name in ("tiny-cpu", "tiny-b"):
        reply = client.completions.create(
            model=name, prompt="hello", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
        )
        assert reply.model == name and reply.usage.completion_tokens == 3
    assert sorted(m.id for m in client.models.list().data) == ["tiny-b", "tiny-cpu"]
    tokens = two_models.metric("neuron_serve:generation_tokens_total", model_name="tiny-b")
    assert tokens >= 3


def test_an_unknown_model_gets_openais_404_listing_the_served_names(two_models):
    client = OpenAI(base_url=f"{two_models.base_url}/v1", api_key="unused")
    with pytest.raises(NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    error = raised.value.body
    assert error["type"] == "model_not_found" and error["param"] == "model" and error["code"] == 404
    assert "'tiny-cpu', 'tiny-b'" in error["message"]


def test_health_reports_each_model(two_models):
    body = requests.get(f"{two_models.base_url}/health", timeout=5).json()
    assert body["status"] == "ready"
    assert body["models"] == {"tiny-cpu": {"status": "ready"}, "tiny-b": {"status": "ready"}}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to give each model its own")
def test_each_models_forward_process_runs_on_cpus_of_its_own(two_models):
    first, second = (os.sched_getaffinity(pid) for pid in forward_process_pids(two_models.process.pid, count=2))
    assert first and second and not first & second


def test_two_models_under_one_name_are_refused(tiny_artifacts):
    done = subprocess.run(
        [sys.executable, "-m", "neuron_serve.cli", "serve", str(tiny_artifacts), str(tiny_artifacts)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "two models are named alike (tiny-cpu, tiny-cpu)" in done.stderr
