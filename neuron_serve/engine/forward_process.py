"""A server replica's forward passes, run in a process of their own.

AOTInductor's Python binding holds the GIL for the whole of a graph call: a 1024-token prefill of the
default model keeps every other thread of the process waiting for about a second. In a server worker
those threads are the request threads and /ping. So the worker's runner lives in a child process:
the engine thread sends each call down a pipe and waits on it (waiting releases the GIL), and the
child writes the logits into shared memory. The child owns the weights and the KV cache.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from neuron_serve.artifact.checksums import recorded_sha256
from neuron_serve.artifact.graphs import GraphSet, GraphUse
from neuron_serve.artifact.manifest import read_manifest
from neuron_serve.backends.base import Cores, Forward, LoadTimes, Runner
from neuron_serve.backends.registry import backend_for, open_runner
from neuron_serve.backends.rpc import serve_calls, transferable
from neuron_serve.model.step import StepBatch


class ForwardProcessError(RuntimeError):
    """The forward process is gone; this replica cannot run its model any more."""


class ForwardProcess:
    """A `Runner` served by a child process that loads the artifact directory, checks it and warms
    it up; calls go down a pipe (`backends.rpc`), logits come back through shared memory."""

    graphs: GraphSet

    def __init__(
        self,
        directory: Path,
        on_exit: Callable[[str], None] = lambda message: None,
        cores: Cores | None = None,
        start_method: str = "spawn",
    ):
        """Starts loading in the child, on `cores` when given (else on this process's); `wait_ready`
        waits for it. `on_exit(message)` is called once if the child is found gone while serving.

        `start_method` "spawn" starts a new interpreter, which imports torch and this package first:
        2 to 3 s of a cold start on 2 cores. "fork" starts the child with them imported, and is for a
        process that has run no parallel torch operator and no other thread (a gunicorn worker whose
        master compiled nothing): a forked child hangs in its first parallel operator when the parent
        has started OpenMP's threads (measured with this torch build), and only the forking thread
        goes with the child, so a lock another thread held would never be released there."""
        if start_method == "fork" and threading.active_count() > 1:
            raise RuntimeError("a forward process is forked before its process starts other threads")
        self._on_exit = on_exit
        files = read_manifest(Path(directory)).files  # an unreadable manifest fails here, before any child
        self._started = time.monotonic()
        context = mp.get_context(start_method)
        self._connection, child_end = context.Pipe()
        # Not a daemon: a tensor-parallel runner in the child starts rank processes of its own.
        self._process = context.Process(
            target=_serve, args=(str(directory), child_end, cores), name="neuron-serve-forward", daemon=False
        )
        self._process.start()
        child_end.close()
        if start_method == "spawn":
            # The child imports for seconds before it checks the artifact's files: read them here
            # meanwhile, so that its check finds their digests recorded (`artifact.checksums`).
            threading.Thread(target=_record_checksums, args=(Path(directory), files), daemon=True).start()
        # Before multiprocessing's own exit handler, which would wait for the child to end by itself.
        atexit.register(self.close)
        self.failure: str | None = None

    def wait_ready(self, times: LoadTimes) -> None:
        """Block until the child has loaded and warmed up; add its load phases to `times`."""
        ready = self._reply()
        times.phases["start_forward_process"] = ready["entered"] - self._started
        for phase, seconds in ready["phases"].items():
            times.phases[phase] = times.phases.get(phase, 0.0) + seconds
        self._logits = ready["logits"]
        self.graphs = ready["graphs"]

    def step(self, batch: StepBatch) -> Forward:
        rows, uses = self._call("step", batch)
        return Forward(self._logits[:rows].clone(), uses)

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._connection.send(None)
            except OSError:
                pass
        self._process.join(timeout=30)
        self._connection.close()

    def _call(self, method: str, *args):
        if self.failure:
            raise ForwardProcessError(self.failure)
        try:
            self._connection.send((method, args))
        except OSError:
            self._gone()
        return self._reply()

    def _reply(self):
        try:
            kind, payload = self._connection.recv()
        except (EOFError, OSError):
            self._gone()
        if kind == "error":
            raise payload
        return payload

    def _gone(self):
        self._process.join(timeout=5)
        self.failure = f"the forward process exited (exit code {self._process.exitcode})"
        self._on_exit(self.failure)
        raise ForwardProcessError(self.failure)


class _SharedLogits:
    """The child's side of the calls: runs them and writes the logits into the shared buffers, so
    that only the graph uses go back through the pipe."""

    def __init__(self, runner: Runner, logits: torch.Tensor):
        self.runner, self.logits = runner, logits

    def step(self, batch: StepBatch) -> tuple[int, list[GraphUse]]:
        forward = self.runner.step(batch)
        rows = forward.logits.shape[0]
        self.logits[:rows].copy_(forward.logits)
        return rows, forward.uses


def _record_checksums(directory: Path, names: Iterable[str]) -> None:
    for name in names:
        with contextlib.suppress(OSError):  # a missing file is for the child's check to report
            recorded_sha256(directory / name)


def _serve(directory: str, connection, cores: Cores | None) -> None:
    """The child: load, warm up, then answer calls until the pipe says stop or closes."""
    entered = time.monotonic()
    # Ctrl-C and the server's SIGTERM are for the worker, which drains its streams first; this
    # process ends when the worker closes the pipe (or dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _close_inherited_listeners()
    if cores is not None:
        backend_for(read_manifest(Path(directory)).recipe.target.kind).enter_replica(cores.first, cores.count)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        runner, ready = _load(Path(directory))
    except Exception as error:
        connection.send(("error", transferable(error)))
        return
    connection.send(("ready", {**ready, "entered": entered}))

    def receive():
        try:
            return connection.recv()
        except EOFError:
            return None

    try:
        serve_calls(
            _SharedLogits(runner, ready["logits"]), receive, lambda kind, result: connection.send((kind, result))
        )
    except (BrokenPipeError, ConnectionResetError):
        pass  # the worker went first (killed at the end of its drain): no one is left to answer
    runner.close()


def _close_inherited_listeners() -> None:
    """A forked child holds its worker's listening sockets: without this, the server's port would stay
    open, queueing connections no one accepts, until the child ends after its worker."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            sock = socket.socket(fileno=int(name))
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.close()
            else:
                sock.detach()


def _load(directory: Path) -> tuple[Runner, dict]:
    """Verify the artifact's checksums, open its runner and warm it up."""
    times = LoadTimes()
    runner, manifest = open_runner(directory, times)
    started = time.perf_counter()
    backend_for(manifest.recipe.target.kind).warm_up(runner)
    times.measure("warm_up", started)
    vocab, dtype = manifest.model_config.vocab_size, manifest.recipe.model.torch_dtype
    rows = runner.graphs.batch_size + runner.graphs.max_prompts  # a step's most logit rows
    logits = torch.empty(rows, vocab, dtype=dtype).share_memory_()
    return runner, {"phases": times.phases, "logits": logits, "graphs": runner.graphs}
