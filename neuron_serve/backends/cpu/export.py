"""One graph of the set (``artifact/graphs.py``), exported with torch.export and compiled with AOTInductor.

Graphs are compiled without their weights (`package_constants_in_so=False`): the runner hands every
graph the same tensors at load time, so an artifact holds one copy of the weights for all buckets.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn

from neuron_serve.artifact.graphs import PREFILL, PREFILL_CHUNK, GraphSpec
from neuron_serve.model.llama import LlamaModel

AOTI_CONFIG = {"aot_inductor.package_constants_in_so": False}


class _Prefill(nn.Module):
    def __init__(self, model: LlamaModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, last_index):
        return self.model.prefill(tokens, last_index)


class _PrefillChunk(_Prefill):
    def forward(self, tokens, start, last_index, k_row, v_row):
        return self.model.prefill_chunk(tokens, start, last_index, k_row, v_row)


class _Decode(_Prefill):
    def __init__(self, model: LlamaModel, kv_len: int):
        super().__init__(model)
        self.kv_len = kv_len

    def forward(self, tokens, positions, k_cache, v_cache):
        return self.model.decode(tokens, positions, k_cache, v_cache, self.kv_len)


def graph_module(model: LlamaModel, spec: GraphSpec, batch_size: int) -> tuple[nn.Module, tuple]:
    """The module to export for `spec` and example inputs of the exact shapes it will be called with."""

    # Every example input is its own tensor: export treats one tensor passed twice as an alias.
    def index() -> torch.Tensor:
        return torch.tensor([0])

    if spec.kind == PREFILL:
        return _Prefill(model), (torch.zeros(1, spec.bucket, dtype=torch.long), index())
    cache = model.new_kv_cache(batch_size)
    if spec.kind == PREFILL_CHUNK:
        tokens = torch.zeros(1, spec.bucket, dtype=torch.long)
        return _PrefillChunk(model), (tokens, index(), index(), *cache.row(0))
    tokens = torch.zeros(batch_size, dtype=torch.long)
    return _Decode(model, spec.bucket), (tokens, tokens.clone(), cache.keys, cache.values)


def compile_graph(model: LlamaModel, spec: GraphSpec, batch_size: int, package_path: Path) -> Path:
    module, inputs = graph_module(model, spec, batch_size)
    with torch.no_grad(), _fake_process_group(model.tp.degree), warnings.catch_warnings():
        # torch 2.13's own pytree code warns about its own deprecated LeafSpec check while packaging.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        exported = torch.export.export(module, inputs)
        path = torch._inductor.aoti_compile_and_package(
            exported, package_path=str(package_path), inductor_configs=AOTI_CONFIG
        )
    return Path(path)


@contextlib.contextmanager
def _fake_process_group(degree: int):
    """Tracing a tensor-parallel model needs a process group of the right size, not real peers:
    the all-reduce is recorded as a collective op that the runner's gloo group executes later."""
    if degree == 1 or torch.distributed.is_initialized():
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=degree)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def constants_map(package, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a compiled graph's constant names (`model.<param>`) to the runner's shared tensors."""
    names = package.get_constant_fqns()
    missing = [n for n in names if n.removeprefix("model.") not in state_dict]
    if missing:
        raise ValueError(f"the weights lack tensors the graph needs: {', '.join(missing[:5])}")
    return {n: state_dict[n.removeprefix("model.")] for n in names}
