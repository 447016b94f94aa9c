"""Tensor parallelism on the CPU: one process per rank, joined by a gloo process group.

Rank 0 lives in the calling process and drives; ranks 1..N-1 are spawned workers that each load
their own weight shard and keep their own part of the KV cache. Every call on rank 0 is broadcast
first, so all ranks run the same graph in the same order and meet in its all-reduces.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neuron_serve.artifact.manifest import ArtifactManifest, read_manifest
from neuron_serve.backends.base import Forward, LoadTimes
from neuron_serve.backends.cpu.runners import open_rank_runner
from neuron_serve.backends.rpc import Call, serve_calls
from neuron_serve.model.step import StepBatch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, degree: int, port: int) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // degree))
    store = dist.TCPStore("127.0.0.1", port, degree, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=degree)


def _receive_broadcast() -> Call | None:
    box: list = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _end_on_error(kind: str, result) -> None:
    """Rank 0 makes the same call and keeps its result; a failure only this rank met must end the
    rank, so that rank 0 fails in its next collective instead of waiting in it."""
    if kind == "error":
        raise result


def _worker(directory: str, rank: int, degree: int, port: int) -> None:
    _join_group(rank, degree, port)
    runner = open_rank_runner(Path(directory), read_manifest(Path(directory)), rank, LoadTimes())
    dist.barrier()
    serve_calls(runner, _receive_broadcast, _end_on_error)
    dist.destroy_process_group()


class TensorParallelRunner:
    """A `Runner` spread over ranks: rank 0 broadcasts each call, then makes it itself."""

    def __init__(self, directory: Path, manifest: ArtifactManifest, times: LoadTimes):
        degree = manifest.recipe.target.tp_degree
        port = _free_port()
        context = mp.get_context("spawn")
        self.workers = [
            context.Process(target=_worker, args=(str(directory), rank, degree, port), daemon=True)
            for rank in range(1, degree)
        ]
        for worker in self.workers:
            worker.start()
        _join_group(0, degree, port)
        self.local = open_rank_runner(directory, manifest, 0, times)
        self.graphs = self.local.graphs
        dist.barrier()

    def call(self, method: str, *args):
        dist.broadcast_object_list([(method, args)], src=0)
        return getattr(self.local, method)(*args)

    def step(self, batch: StepBatch) -> Forward:
        self.graphs.step_shape(batch)  # a step every rank would refuse is refused here, unsent
        return self.call("step", batch)

    def close(self) -> None:
        dist.broadcast_object_list([None], src=0)
        for worker in self.workers:
            worker.join(timeout=30)
        dist.destroy_process_group()
