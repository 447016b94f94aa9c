"""A CPU stand-in for the parts of neuronx-distributed that the neuron backend calls, for tests only.

The Neuron SDK cannot be installed here, so these classes reproduce the *contracts* our code relies
on, written from NxD's published source (neuronx-distributed 2.29, commit fbac349b):

- ``parallel_layers.layers.ColumnParallelLinear`` / ``RowParallelLinear``: constructor signatures,
  ``tensor_model_parallel`` / ``partition_dim`` attributes, column split on dim 0, row split on dim 1
  with the output all-reduced and the whole bias added after the reduce.
- ``trace.model_builder.BaseModelInstance`` (model_builder.py:381-391): ``load_module()`` calls the
  zero-argument factory, ``get(bucket_rank)`` returns ``(module, input_output_aliases)``, a dict from
  a Parameter of the module to the index of the output that updates it.
- ``trace.model_builder.ModelBuilder`` (``add``, ``trace``, ``build_nxd_model`` at 1053-1109) and
  ``trace.spmd`` (``NxDModel``, ``NxDModelExecutor``, ``StateInitializer``):
  * the saved model is one trace of the executor made from the example inputs of the *last* graph
    added, so a call with another number of arguments fails;
  * the router looks up ``str([list(t.shape) for t in inputs])`` (a later graph with the same shapes
    overwrites an earlier one) and raises ValueError on a miss;
  * aliased parameters are states: ``initialize`` allocates them as zeros per rank, with the names,
    shapes and dtypes of the first graph's, and every graph shares them by name; the graph's aliased
    outputs are written into them in place and only the other outputs are returned (one bare tensor
    when there is one);
  * ``initialize(weights, start_rank)`` takes one dict of weights per rank, by parameter name.

What it is not: a compiler. Each rank's module runs eagerly on the CPU, one thread per rank, and the
parallel layers' collectives meet at a barrier (`SpmdWorld`).
"""

from __future__ import annotations

import importlib.machinery
import sys
import threading
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class SpmdWorld:
    """NxD's SPMD execution, emulated: one thread per rank runs the same graph, and the parallel
    layers' collectives meet at a barrier (with a timeout, so a failing rank cannot hang)."""

    def __init__(self, degree: int):
        self.degree = degree
        self.local = threading.local()
        self.barrier = threading.Barrier(degree, timeout=60)
        self.slots: list = [None] * degree

    def exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``x``, in rank order."""
        self.slots[getattr(self.local, "rank", 0)] = x
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()
        return parts

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.degree == 1 else torch.stack(self.exchange(x)).sum(0)

    def run(self, per_rank) -> list:
        results, errors = [None] * self.degree, []

        def work(rank: int) -> None:
            self.local.rank = rank
            try:
                with torch.inference_mode():
                    results[rank] = per_rank(rank)
            except Exception as error:  # re-raised below, in the caller's thread
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=work, args=(rank,)) for rank in range(self.degree)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


def fake_nxd_layers(world: SpmdWorld):
    """ColumnParallelLinear and RowParallelLinear as ``parallel_layers/layers.py`` defines them."""

    def mark(param: nn.Parameter, dim: int) -> None:
        param.tensor_model_parallel, param.partition_dim = True, dim

    class ColumnParallelLinear(nn.Linear):
        def __init__(self, input_size, output_size, bias=True, gather_output=True, dtype=torch.float32):
            super().__init__(input_size, output_size // world.degree, bias=bias, dtype=dtype)
            assert not gather_output
            mark(self.weight, 0)
            if bias:
                mark(self.bias, 0)

    class RowParallelLinear(nn.Linear):
        def __init__(self, input_size, output_size, bias=True, input_is_parallel=False, dtype=torch.float32):
            super().__init__(input_size // world.degree, output_size, bias=bias, dtype=dtype)
            assert input_is_parallel
            mark(self.weight, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = world.all_reduce(F.linear(x, self.weight))
            return out if self.bias is None else out + self.bias

    return ColumnParallelLinear, RowParallelLinear


class BaseModelInstance:
    def __init__(self, module_cls, input_output_aliases):
        self.module_cls, self.module = module_cls, None
        self.input_output_aliases = [input_output_aliases]

    def load_module(self):
        self.module = self.module_cls()

    def get(self, bucket_rank, **kwargs):
        return self.module, self.input_output_aliases[0]


class _Graph:
    """One key's graph: a module per rank (the same code; NxD compiles it once for every rank)."""

    def __init__(self, instance: BaseModelInstance, degree: int):
        self.modules, self.aliases = [], []
        for _ in range(degree):
            instance.load_module()
            module, aliases = instance.get(0)
            names = {id(p): name for name, p in module.named_parameters()}
            assert all(id(p) in names for p in aliases), "an alias names a parameter the module does not hold"
            self.modules.append(module)
            self.aliases.append({names[id(p)]: index for p, index in aliases.items()})

    def states(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        params = dict(self.modules[0].named_parameters())
        return {name: (params[name].shape, params[name].dtype) for name in self.aliases[0]}


class NxDModel:
    """``trace/spmd.py`` NxDModel: the graphs, their router, the weights and the states."""

    def __init__(self, graphs: dict[str, _Graph], shape_map: dict[str, str], world: SpmdWorld):
        self.graphs, self.shape_map, self.world = graphs, shape_map, world
        self.state: list[dict[str, torch.Tensor]] = []
        self.calls: list[tuple[torch.Tensor, ...]] = []  # every call's inputs, for the tests to inspect

    def initialize(self, weights: list[dict[str, torch.Tensor]], start_rank: torch.Tensor) -> None:
        assert len(weights) == self.world.degree, "one weights dict per rank"
        first = next(iter(self.graphs.values()))
        self.state = [
            {name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in first.states().items()} for _ in weights
        ]
        for graph in self.graphs.values():
            for rank, module in enumerate(graph.modules):
                assert set(graph.aliases[rank]) == set(self.state[rank]), "every graph has the same states"
                params = {**weights[rank], **self.state[rank]}
                missing, _ = module.load_state_dict(params, strict=False, assign=True)
                assert not missing, f"weights missing for rank {rank}: {missing}"

    def forward(self, inputs: list[torch.Tensor]):
        key = str([list(t.shape) for t in inputs])
        if key not in self.shape_map:
            raise ValueError(f"Input shape {key} not found in input_shape_map: {list(self.shape_map)}")
        graph = self.graphs[self.shape_map[key]]
        self.calls.append(tuple(inputs))
        outputs = self.world.run(lambda rank: graph.modules[rank](*inputs))
        for rank, rank_outputs in enumerate(outputs):
            for name, index in graph.aliases[rank].items():
                self.state[rank][name].copy_(rank_outputs[index])
        kept = [out for index, out in enumerate(outputs[0]) if index not in graph.aliases[0].values()]
        return kept[0] if len(kept) == 1 else kept


class TracedExecutor(nn.Module):
    """``NxDModelExecutor`` after ``torch.jit.trace`` with the last graph's example inputs: its
    forward takes exactly that many tensors, of those dtypes."""

    def __init__(self, nxd_model: NxDModel, example: tuple[torch.Tensor, ...]):
        super().__init__()
        self.nxd_model, self.dtypes = nxd_model, [t.dtype for t in example]

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.dtypes):
            raise RuntimeError(
                f"forward() expected {len(self.dtypes)} arguments (the traced signature), got {len(inputs)}"
            )
        dtypes = [t.dtype for t in inputs]
        if dtypes != self.dtypes:
            raise RuntimeError(f"forward() traced with input dtypes {self.dtypes}, called with {dtypes}")
        return self.nxd_model.forward(list(inputs))


def model_builder_class(world: SpmdWorld):
    class ModelBuilder:
        def __init__(self, router, tp_degree, checkpoint_loader, compiler_workdir=None, **kwargs):
            assert tp_degree == world.degree, (tp_degree, world.degree)
            self.models: dict[str, tuple[BaseModelInstance, list]] = {}

        def add(self, key, model_instance, example_inputs, compiler_args=None, **kwargs):
            assert isinstance(compiler_args, str | None), "ModelBuilder appends to compiler_args with +="
            self.models[key] = (model_instance, example_inputs)
            return self

        def trace(self, initialize_model_weights=True):
            graphs, shape_map = {}, {}
            for key, (instance, examples) in self.models.items():
                graphs[key] = _Graph(instance, world.degree)
                for example in examples:
                    shape_map[str([list(t.shape) for t in example])] = key
            last_example = examples[0]
            return TracedExecutor(NxDModel(graphs, shape_map, world), last_example)

    return ModelBuilder


SAVED: dict[str, TracedExecutor] = {}  # torch.jit.save / load of the stand-in: by path, in memory


def install(monkeypatch, degree: int) -> SpmdWorld:
    """Make ``import neuronx_distributed`` (and ``torch_neuronx``) give these stand-ins, for a TP world
    of ``degree``; ``torch.jit.save`` / ``load`` keep the traced stand-in in memory."""
    world = SpmdWorld(degree)
    names = [
        "neuronx_distributed",
        "neuronx_distributed.parallel_layers",
        "neuronx_distributed.parallel_layers.layers",
        "neuronx_distributed.trace",
        "neuronx_distributed.trace.model_builder",
        "torch_neuronx",
    ]
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec reads it
        monkeypatch.setitem(sys.modules, name, module)
    layers = modules["neuronx_distributed.parallel_layers.layers"]
    layers.ColumnParallelLinear, layers.RowParallelLinear = fake_nxd_layers(world)
    builder = modules["neuronx_distributed.trace.model_builder"]
    builder.BaseModelInstance, builder.ModelBuilder = BaseModelInstance, model_builder_class(world)

    def save(traced, path) -> None:
        Path(path).write_bytes(b"stand-in")
        SAVED[str(path)] = traced

    monkeypatch.setattr(torch.jit, "save", save)
    monkeypatch.setattr(torch.jit, "load", lambda path: SAVED[str(path)])
    return world
