"""A server replica's forward passes, run in a process of their own.

AOTInductor's Python binding holds the GIL for the whole of a graph call: a 1024-token prefill of the
default model keeps every other thread of the process waiting for about a second. In a server worker
those threads are the request threads and /ping. So the worker's runner lives in a child process:
the engine thread sends each call down a pipe and waits on it (waiting releases the GIL), and the
child writes the logits into shared memory. The child owns the weights and the KV cache.
"""

from __future__ import annotations

import atexit
import os
import pickle
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from neuron_serve.aot import LoadTimes, open_runner
from neuron_serve.config import ModelConfig
from neuron_serve.runner import BucketUsage, warm_up
from neuron_serve.weights import DTYPES


class ForwardProcessError(RuntimeError):
    """The forward process is gone; this replica cannot run its model any more."""


class ForwardProcess:
    """The runner interface the engine uses (prefill, decode, usage, the shape attributes), served by
    a child process that loads the artifact directory, checks it and runs every graph once."""

    def __init__(self, directory: Path, on_exit: Callable[[str], None] = lambda message: None):
        """Starts loading in the child; `wait_ready` waits for it. `on_exit(message)` is called
        once if the child is found gone while serving."""
        self._on_exit = on_exit
        self._started = time.monotonic()
        context = mp.get_context("spawn")  # fork is unsafe in a process that already runs threads
        self._connection, child_end = context.Pipe()
        # Not a daemon: a tensor-parallel runner in the child starts rank processes of its own.
        self._process = context.Process(
            target=_serve, args=(str(directory), child_end), name="neuron-serve-forward", daemon=False
        )
        self._process.start()
        child_end.close()
        # Before multiprocessing's own exit handler, which would wait for the child to end by itself.
        atexit.register(self.close)
        self.failure: str | None = None
        self.usage = BucketUsage()

    def wait_ready(self, times: LoadTimes) -> None:
        """Block until the child has loaded and warmed up; add its load phases to `times`."""
        info = self._reply()
        times.phases["start_forward_process"] = info.pop("entered") - self._started
        for phase, seconds in info.pop("phases").items():
            times.phases[phase] = times.phases.get(phase, 0.0) + seconds
        self._decode_logits = info.pop("decode_logits")
        self._prompt_logits = info.pop("prompt_logits")
        self.batch_size = info["batch_size"]
        self.max_seq_len = info["max_seq_len"]
        self.context_buckets = info["context_buckets"]
        self.token_buckets = info["token_buckets"]

    def prefill(self, prompt: list[int], slot: int) -> torch.Tensor:
        self._call("prefill", prompt, slot)
        return self._prompt_logits.clone()

    def decode(self, tokens: list[int], positions: list[int], active: int | None = None) -> torch.Tensor:
        self._call("decode", tokens, positions, active)
        return self._decode_logits.clone()

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._connection.send(None)
            except OSError:
                pass
        self._process.join(timeout=30)
        self._connection.close()

    def _call(self, method: str, *args) -> None:
        if self.failure:
            raise ForwardProcessError(self.failure)
        try:
            self._connection.send((method, args))
        except OSError:
            self._gone()
        self.usage = self._reply()

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


def _serve(directory: str, connection) -> None:
    """The child: load, warm up, then answer calls until the pipe says stop or closes."""
    entered = time.monotonic()
    # Ctrl-C and the server's SIGTERM are for the worker, which drains its streams first; this
    # process ends when the worker closes the pipe (or dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        runner, buffers, info = _load(Path(directory))
    except Exception as error:
        connection.send(("error", _transferable(error)))
        return
    connection.send(("ready", {**info, "entered": entered}))
    while True:
        try:
            request = connection.recv()
        except EOFError:
            break
        if request is None:
            break
        method, args = request
        try:
            buffers[method].copy_(getattr(runner, method)(*args))
            connection.send(("ok", runner.usage))
        except Exception as error:
            connection.send(("error", _transferable(error)))
    if hasattr(runner, "close"):
        runner.close()


def _load(directory: Path):
    times = LoadTimes()
    runner, manifest = open_runner(directory, times)
    started = time.perf_counter()
    warm_up(runner, every_graph=manifest.recipe["target"]["kind"] == "neuron")
    times.measure("warm_up", started)
    vocab = ModelConfig.from_dict(manifest.model_config).vocab_size
    dtype = DTYPES[manifest.recipe["model"]["dtype"]]
    buffers = {
        "prefill": torch.empty(vocab, dtype=dtype).share_memory_(),
        "decode": torch.empty(runner.batch_size, vocab, dtype=dtype).share_memory_(),
    }
    info = {
        "phases": times.phases,
        "prompt_logits": buffers["prefill"],
        "decode_logits": buffers["decode"],
        "batch_size": runner.batch_size,
        "max_seq_len": runner.max_seq_len,
        "context_buckets": runner.context_buckets,
        "token_buckets": runner.token_buckets,
    }
    return runner, buffers, info


def _transferable(error: Exception) -> Exception:
    """The error itself when it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
