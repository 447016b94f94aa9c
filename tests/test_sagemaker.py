"""SageMaker's ways of configuring a container: /opt/ml/model (SM_MODEL_DIR here), LMI's OPTION_*
variables, SAGEMAKER_* and NEURON_SERVE_* variables."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import requests
from server_handle import ServerHandle

from neuron_serve.cli import build_parser
from neuron_serve.server.environment import apply_environment
from neuron_serve.server.sagemaker import lmi_options, sagemaker_target

SERVING_PROPERTIES = """\
engine=Python
option.model_id={model}
option.n_positions=128
option.max_rolling_batch_size=4
option.context_length_estimate=16,32
option.rolling_batch=auto
"""


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_a_server_configured_as_sagemaker_configures_it_serves_ping_and_invocations(tiny_dir, tiny_artifacts, tmp_path):
    """/opt/ml/model holds an LMI serving.properties naming the model; SageMaker's variables set the
    port and the workers. With no NeuronCores here the model is compiled for the CPU."""
    model_dir = tmp_path / "opt" / "ml" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "serving.properties").write_text(SERVING_PROPERTIES.format(model=tiny_dir))
    env = {"SM_MODEL_DIR": str(model_dir), "SAGEMAKER_MODEL_SERVER_WORKERS": "1", "OPTION_DTYPE": "fp32"}
    server = ServerHandle(tiny_artifacts, targets=[], env=env, port_option=False, ready_timeout=600)
    try:
        assert requests.get(f"{server.base_url}/ping", timeout=5).status_code == 200
        body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4, "do_sample": False}}
        reply = requests.post(f"{server.base_url}/invocations", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert isinstance(reply.json()["generated_text"], str)
        log = server.logs()
        assert "option.rolling_batch=auto: neuron-serve always does continuous batching" in log
        assert "target: cpu, TP 1, one worker: this host has no NeuronCores" in log
        assert "port=" in log and "from SAGEMAKER_BIND_TO_PORT" in log
    finally:
        server.stop()


def test_option_model_id_on_s3_serves_the_artifact_there(tiny_artifacts, s3_bucket, tmp_path):
    from neuron_serve.artifact.remote import push_artifact

    url = push_artifact(tiny_artifacts, f"s3://{s3_bucket}/models/")
    env = {"OPTION_MODEL_ID": str(url), "SM_MODEL_DIR": str(tmp_path / "empty")}
    server = ServerHandle(tiny_artifacts, targets=[], env=env, port_option=False)
    try:
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
        assert requests.post(f"{server.base_url}/invocations", json=body, timeout=60).status_code == 200
    finally:
        server.stop()


def test_the_model_directory_may_hold_an_artifact_or_a_recipe(tiny_artifacts, tmp_path):
    assert sagemaker_target({"SM_MODEL_DIR": str(tiny_artifacts)}) == str(tiny_artifacts)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "mine.toml").write_text('name = "mine"\n')
    assert sagemaker_target({"SM_MODEL_DIR": str(recipes)}) == str(recipes / "mine.toml")


def test_nothing_to_serve_names_every_place_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"set OPTION_MODEL_ID or NEURON_SERVE_MODEL.*\(SM_MODEL_DIR\)"):
        sagemaker_target({"SM_MODEL_DIR": str(tmp_path)})


def test_lmi_variables_are_serving_properties_options():
    env = {"OPTION_TENSOR_PARALLEL_DEGREE": "8", "OPTION_MODEL_ID": "s3://b/m", "PATH": "/bin"}
    assert lmi_options(env) == {"option.tensor_parallel_degree": "8", "option.model_id": "s3://b/m"}


def test_the_command_line_wins_then_neuron_serve_names_then_sagemakers():
    env = {"SAGEMAKER_BIND_TO_PORT": "9000", "SAGEMAKER_MODEL_SERVER_WORKERS": "3", "NEURON_SERVE_WORKERS": "2"}
    args = serve_args("--port", "8081")
    taken = apply_environment(args, env)
    assert (args.port, args.workers) == (8081, 2)
    assert taken == ["workers=2 from NEURON_SERVE_WORKERS"]
    args = serve_args()
    apply_environment(args, {"SAGEMAKER_MODEL_SERVER_TIMEOUT": "600", "NEURON_SERVE_MODEL": "a b"})
    assert (args.timeout, args.targets) == (600, ["a", "b"])


def test_a_bad_variable_is_named():
    with pytest.raises(ValueError, match=r"SAGEMAKER_MODEL_SERVER_WORKERS='two': expected a whole number"):
        apply_environment(serve_args(), {"SAGEMAKER_MODEL_SERVER_WORKERS": "two"})


def test_every_variable_is_in_the_readme_table():
    from neuron_serve.server.environment import MODEL_VARIABLE, SERVE_SETTINGS

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("## Configuration by environment") :]
    names = [v for s in SERVE_SETTINGS for v in s.variables] + [MODEL_VARIABLE, "OPTION_MODEL_ID", "SM_MODEL_DIR"]
    names += ["NEURON_SERVE_CACHE", "NEURON_SERVE_SHARED_CACHE", "NEURON_SERVE_INSTANCE", "NEURON_SERVE_API_KEY"]
    assert [name for name in names if f"`{name}`" not in table] == []
