"""A server replica's runner in its own process: same logits as in-process, errors that cross the
process boundary intact, and a clear failure when the process dies."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import openai
import pytest
import requests
from conftest import tiny_recipe
from server_handle import ServerHandle, child_pids, forward_process_pids

from neuron_serve.artifact.manifest import CorruptArtifactError
from neuron_serve.backends.base import LoadTimes, run_decode, run_prompt
from neuron_serve.backends.registry import open_runner
from neuron_serve.compiler.compile import compile_recipe
from neuron_serve.engine.forward_process import ForwardProcess, ForwardProcessError
from neuron_serve.model.step import PromptChunk, StepBatch
from neuron_serve.server.command import forward_start_method


@pytest.fixture(scope="module")
def forward(tiny_artifacts):
    process = ForwardProcess(tiny_artifacts)
    times = LoadTimes()
    process.wait_ready(times)
    process.load_phases = times.phases
    yield process
    process.close()


def test_logits_and_padding_counts_match_the_in_process_runner(forward, tiny_artifacts):
    local, _ = open_runner(tiny_artifacts)
    prompt = [5, 9, 200, 31, 7]
    prefill = StepBatch(chunks=[PromptChunk(1, 0, prompt), PromptChunk(2, 0, prompt[:3])])
    mixed = StepBatch([1], [42], [len(prompt)], [PromptChunk(2, 3, prompt[3:])])
    for batch in (prefill, mixed):
        remote, here = forward.step(batch), local.step(batch)
        assert remote.logits.shape == here.logits.shape == (2, forward._logits.shape[1])
        assert (remote.logits - here.logits).abs().max() < 1e-5
        assert remote.uses == here.uses
    assert forward.graphs == local.graphs
    assert {"start_forward_process", "verify_checksums", "load_graphs", "warm_up"} <= set(forward.load_phases)


def test_an_error_in_a_call_is_raised_here_and_the_process_serves_on(forward):
    max_seq_len = forward.graphs.max_seq_len
    with pytest.raises(ValueError, match=f"must be 1 to {max_seq_len - 1} tokens"):
        run_prompt(forward, [1] * max_seq_len, 0)
    with pytest.raises(ValueError, match="past the largest bucket"):
        forward.step(StepBatch([0], [1], [max_seq_len]))
    assert run_prompt(forward, [1, 2, 3], 0).shape == (forward._logits.shape[1],)


def test_a_corrupt_artifact_is_reported_with_its_own_error(tiny_artifacts, tmp_path):
    copy = compile_recipe(tiny_recipe(), tmp_path / "copy").out_dir
    target = copy / "graphs" / "step.pt2"
    data = target.read_bytes()
    target.unlink()  # a new file: the cache entry behind the hard link stays intact
    target.write_bytes(data[: len(data) // 2])
    process = ForwardProcess(copy)
    with pytest.raises(CorruptArtifactError, match=r"graphs/step\.pt2"):
        process.wait_ready(LoadTimes())
    process.close()


def test_a_dead_forward_process_is_a_clear_error(tiny_artifacts):
    reported = []
    process = ForwardProcess(tiny_artifacts, on_exit=reported.append)
    process.wait_ready(LoadTimes())
    os.kill(process._process.pid, signal.SIGKILL)
    with pytest.raises(ForwardProcessError, match=r"exited \(exit code -9\)"):
        run_decode(process, [0], [0], [1])
    with pytest.raises(ForwardProcessError):  # and at once from then on
        run_prompt(process, [1], 0)
    assert reported == ["the forward process exited (exit code -9)"]
    process.close()


def test_server_reports_a_dead_forward_process(tiny_artifacts):
    server = ServerHandle(tiny_artifacts)
    try:
        os.kill(forward_process_pids(server.process.pid)[0], signal.SIGKILL)
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="forward process exited"):
            client.completions.create(model=server.model, prompt="hello", max_tokens=4)
        health = requests.get(f"{server.base_url}/health", timeout=5)
        assert health.status_code == 503 and "forward process exited" in health.json()["error"]
        assert requests.get(f"{server.base_url}/ping", timeout=5).status_code == 503
    finally:
        server.stop()


def test_a_forward_process_is_forked_only_before_other_threads_run(tiny_artifacts):
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        with pytest.raises(RuntimeError, match="before its process starts other threads"):
            ForwardProcess(tiny_artifacts, start_method="fork")
    finally:
        release.set()
        other.join()


def test_a_server_that_compiles_spawns_its_forward_processes_and_one_that_does_not_forks_them():
    assert forward_start_method(["artifacts/a", "s3://bucket/models/b"]) == "fork"
    assert forward_start_method(["artifacts/a", "compile/b.toml"]) == "spawn"


def test_the_forked_forward_process_does_not_hold_the_servers_port(tiny_artifacts):
    server = ServerHandle(tiny_artifacts)
    try:
        (forward,) = forward_process_pids(server.process.pid)
        assert not _listening_inodes(server.port) & _socket_inodes(forward)
        workers = child_pids(server.process.pid)
        assert any(_listening_inodes(server.port) & _socket_inodes(worker) for worker in workers)
    finally:
        server.stop()


def _socket_inodes(pid: int) -> set[str]:
    links = (os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
    return {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}


def _listening_inodes(port: int) -> set[str]:
    """/proc/net/tcp's sockets on `port` in state LISTEN (0A); column 9 is the inode."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return {row[9] for row in rows if int(row[1].split(":")[1], 16) == port and row[3] == "0A"}
