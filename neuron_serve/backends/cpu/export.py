"""The step graph (``model/step.py``), exported with torch.export and compiled with AOTInductor.

One graph serves every step shape of the graph set: its decode rows, prompt tokens, prompts and KV
length are dynamic dimensions bounded by the set's largest shape, and the runner only ever calls it
at the set's bucket shapes, as a static-shape backend would run them. On the CPU one graph of
dynamic shape costs no speed: the matmuls are oneDNN/MKL calls sized at run time either way, and
Inductor's generated loops take their bounds as arguments. A graph per bucket shape would only
multiply compile time (about 100 s per graph for the default model on 2 cores).

A step without prompts would still carry one pad prompt token through the step graph (a dimension
of size 0 is no shape AOTInductor's kernels accept: they divide by it), and that token's attention
costs 30 calls of SDPA, about 2.8 ms of a 17 ms batch-1 step of the default model. So where the
decode rows read their own cached positions (`LlamaModel.exact_decode_keys`, which needs no KV
bucket), the package holds a second model, `DECODE_MODEL`: the decode rows alone (as NxD Inference's
token-generation model beside its context-encoding one).

The graphs are compiled without their weights (`package_constants_in_so=False`): the runner hands them
the rank's tensors at load time, so an artifact holds one copy of the weights.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.step import PromptChunk, StepBatch, StepShape, step_tensors

AOTI_CONFIG = {"aot_inductor.package_constants_in_so": False, "aot_inductor.package": True}
STEP_MODEL, DECODE_MODEL = "model", "decode"  # the models' names in the package
# A profiler scope around each generated kernel, so that torch.profiler sees inside the graph. Only in
# the build `neuron-serve profile` compiles: the scopes cost 7-14 % of a decode step of the default
# model (24.97 -> 28.45 ms at 1 row, 127 -> 136 ms at 8 rows x 1024 keys, 150 interleaved calls each).
KERNEL_PROFILE_CONFIG = {"cpp.enable_kernel_profile": True}


class _Step(nn.Module):
    def __init__(self, model: LlamaModel):
        super().__init__()
        self.model = model

    def forward(self, decode_tokens, decode_positions, tokens, positions, cached_slot, visible, last, k_cache, v_cache):
        return self.model.step(
            decode_tokens, decode_positions, tokens, positions, cached_slot, visible, last, k_cache, v_cache
        )


class _Decode(nn.Module):
    def __init__(self, model: LlamaModel):
        super().__init__()
        self.model = model

    def forward(self, decode_tokens, decode_positions, k_cache, v_cache):
        # The KV length is not read: the decode rows read their own positions (exact_decode_keys).
        return self.model.decode(decode_tokens, decode_positions, k_cache, v_cache, self.model.max_seq_len)


def _dim(name: str, largest: int, smallest: int = 1) -> Dim | None:
    return Dim(name, min=smallest, max=largest) if largest > smallest else None


def step_example(model: LlamaModel, graphs: GraphSet) -> tuple[tuple, tuple]:
    """Example inputs of a shape inside every bound (export specializes a dimension seen as 1),
    and the dynamic dimensions of each input."""
    bounds = graphs.step_bounds()
    shape = StepShape(
        min(2, bounds.decode_rows), min(2, bounds.prompt_tokens), min(2, bounds.prompts), graphs.token_buckets[0]
    )
    chunks = [PromptChunk(shape.decode_rows - 1, 0, [1] * shape.prompt_tokens)]
    inputs = step_tensors(StepBatch([0], [1], [1], chunks), shape)
    cache = model.new_kv_cache(graphs.batch_size)
    rows, tokens = _dim("decode_rows", bounds.decode_rows), _dim("prompt_tokens", bounds.prompt_tokens)
    if len(graphs.token_buckets) > 1:
        keys = Dim("keys", min=graphs.token_buckets[0] + 1, max=bounds.kv_len + bounds.prompt_tokens)
    else:  # one KV length: a step's keys are it plus the step's prompt tokens, which export must be told
        keys = tokens + graphs.token_buckets[0] if tokens is not None else None
    prompts = _dim("prompts", bounds.prompts)
    dynamic = ({0: rows}, {0: rows}, {0: tokens}, {0: tokens}, None, {0: tokens, 1: keys}, {0: prompts}, None, None)
    return (*inputs, cache.keys, cache.values), dynamic


def decode_example(model: LlamaModel, graphs: GraphSet) -> tuple[tuple, tuple]:
    """`step_example` for `DECODE_MODEL`: decode tokens and positions [S], then the cache."""
    rows = min(2, graphs.batch_size)
    cache = model.new_kv_cache(graphs.batch_size)
    inputs = (torch.ones(rows, dtype=torch.long), torch.arange(1, rows + 1), cache.keys, cache.values)
    dim = _dim("decode_rows", graphs.batch_size)
    return inputs, ({0: dim}, {0: dim}, None, None)


def compile_step_graph(model: LlamaModel, graphs: GraphSet, package_path: Path, kernel_profile: bool = False) -> Path:
    """The package of the step graph (`STEP_MODEL`) and, where the model has one, `DECODE_MODEL`."""
    from torch._inductor import aot_compile  # not at the top: a runner imports this module, not these
    from torch._inductor.package import package_aoti

    configs = AOTI_CONFIG | (KERNEL_PROFILE_CONFIG if kernel_profile else {})
    modules = {STEP_MODEL: (_Step(model), *step_example(model, graphs))}
    if model.exact_decode_keys:
        modules[DECODE_MODEL] = (_Decode(model), *decode_example(model, graphs))
    files = {}
    with torch.no_grad(), _fake_process_group(model.tp.degree), warnings.catch_warnings():
        # torch 2.13's own pytree code warns about its own deprecated LeafSpec check while packaging.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        for name, (module, inputs, dynamic) in modules.items():
            exported = torch.export.export(module, inputs, dynamic_shapes=dynamic)
            # torch._inductor.aoti_compile_and_package, for several models in one package.
            files[name] = aot_compile(exported.module(check_guards=False), inputs, options=dict(configs))
        return Path(package_aoti(str(package_path), files))


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
