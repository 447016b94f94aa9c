"""The Neuron compile and runner path.

Everywhere: the pure parts (which layers become column/row-parallel, that our weight shards are what
NxD's sharding would give, the graphs' calling convention, core counts) and the whole runner path on
the CPU, with stand-in parallel layers and a CPU stand-in for the loaded model that routes by input
shapes as NxD's does. Where the Neuron SDK and a NeuronCore exist: the tiny model compiled for real
at TP 1 and TP 2, against the CPU eager model.
"""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_recipe
from safetensors.torch import save_file
from torch import nn

from neuron_serve.artifact.manifest import ArtifactManifest, GraphRecord, toolchain_versions, write_manifest
from neuron_serve.backends.base import LoadTimes, run_prompt
from neuron_serve.backends.cpu.runners import EagerRunner
from neuron_serve.backends.neuron import sdk
from neuron_serve.backends.neuron.calling_convention import (
    MODEL_PREFIX,
    RANK_WEIGHT,
    cache_heads,
    check_distinct_shapes,
    gather_heads,
    rank_weights,
    select_local_heads,
)
from neuron_serve.backends.neuron.compile import compile_for_neuron, graph_factory, recipe_example_inputs, recipe_graphs
from neuron_serve.backends.neuron.cores import visible_core_count
from neuron_serve.backends.neuron.parallel_model import (
    LayerReducedTensorParallel,
    build_parallel_model,
    parallel_linear_plan,
)
from neuron_serve.backends.neuron.runner import NeuronRunner, check_visible_cores
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.sharding import shard_state_dict
from neuron_serve.model.state import stored_shard
from neuron_serve.model.step import PromptChunk, StepBatch
from neuron_serve.weights.loaded import LoadedModel
from neuron_serve.weights.loader import build_model
from neuron_serve.weights.tiny import TINY_CONFIG, random_state_dict

# LlamaModel.group (query heads per KV head, for the prompt mask) is computed from the global head
# counts; with replicated KV heads (fewer than ranks) each rank's ratio differs from it.
PROMPTS = {16: list(range(3, 14)), 32: list(range(40, 70)), "chunked": [(i * 11) % 380 + 2 for i in range(90)]}


def neuron_recipe(tp: int = 1):
    # auto_cast none: fp32 on the NeuronCore too, so logits can be compared with the CPU's.
    changes = {"target.kind": "neuron", "target.instance": "inf2.xlarge", "target.tp_degree": tp}
    return tiny_recipe(**changes, **{"compiler.auto_cast": "none"})


def tiny_config(**hf_overrides) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    hf = dict(TINY_CONFIG, **hf_overrides)
    state = {k.removeprefix("model."): v for k, v in random_state_dict(hf, seed=1).items()}
    return ModelConfig.from_hf(hf), state


class SpmdWorld:
    """NxD's SPMD execution, emulated on the CPU: one thread per rank runs the same graph, and the
    parallel layers' collectives meet at a barrier (with a timeout, so a failing rank cannot hang)."""

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

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.degree == 1 else torch.cat(self.exchange(x), dim=-1)

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
    """Stand-ins with NxD's constructor signatures, partition attributes and forward semantics
    (parallel_layers.layers): column weight (and bias, without gather) split on dim 0; row weight
    split on dim 1, output all-reduced, then the whole bias added."""

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


@pytest.fixture
def emulated_nxd(monkeypatch):
    """Install CPU stand-ins for the ``neuronx_distributed`` modules our code imports; returns a
    function that points them at a new SpmdWorld of the given degree."""

    class SPMDRank(nn.Module):
        def __init__(self, world_size: int):
            super().__init__()
            self.rank = nn.Parameter(torch.zeros(1, dtype=torch.int32), requires_grad=False)

    package, parallel_layers = types.ModuleType("neuronx_distributed"), types.ModuleType("parallel_layers")
    layers, mappings = types.ModuleType("layers"), types.ModuleType("mappings")
    package.parallel_layers, parallel_layers.layers, parallel_layers.mappings = parallel_layers, layers, mappings
    modules = {"": package, ".parallel_layers": parallel_layers, ".parallel_layers.layers": layers}
    for name, module in {**modules, ".parallel_layers.mappings": mappings}.items():
        monkeypatch.setitem(sys.modules, "neuronx_distributed" + name, module)

    def world_of(degree: int) -> SpmdWorld:
        world = SpmdWorld(degree)
        layers.ColumnParallelLinear, layers.RowParallelLinear = fake_nxd_layers(world)
        layers.SPMDRank, mappings.gather_from_tensor_model_parallel_region = SPMDRank, world.gather_last_dim
        return world

    return world_of


# ---------------------------------------------------------------- the parallel model


def test_projections_map_to_column_and_row_parallel_layers():
    config, _ = tiny_config()
    model = LlamaModel(config, 32, LayerReducedTensorParallel(2, 0))
    plan = {spec.name: spec for spec in parallel_linear_plan(model)}
    assert len(plan) == 7 * config.num_hidden_layers  # lm_head stays replicated
    hd, hidden, inter = config.head_dim, config.hidden_size, config.intermediate_size
    q, k, o = plan["layers.1.self_attn.q_proj"], plan["layers.1.self_attn.k_proj"], plan["layers.1.self_attn.o_proj"]
    assert (q.style, q.input_size, q.output_size) == ("column", hidden, config.num_attention_heads * hd)
    assert (k.style, k.output_size) == ("column", config.num_key_value_heads * hd)
    assert (o.style, o.input_size, o.output_size) == ("row", config.num_attention_heads * hd, hidden)
    assert (plan["layers.0.mlp.up_proj"].style, plan["layers.0.mlp.up_proj"].output_size) == ("column", inter)
    assert (plan["layers.0.mlp.down_proj"].style, plan["layers.0.mlp.down_proj"].input_size) == ("row", inter)


def test_fewer_kv_heads_than_ranks_replicates_one_head_per_rank():
    config, _ = tiny_config()  # 2 KV heads over 4 ranks
    plan = {spec.name: spec for spec in parallel_linear_plan(LlamaModel(config, 8, LayerReducedTensorParallel(4, 0)))}
    assert plan["layers.0.self_attn.v_proj"].output_size == 4 * config.head_dim
    assert cache_heads(config, 4) == 4 and cache_heads(config, 2) == 2 and cache_heads(config, 1) == 2


def test_the_model_reduces_only_in_its_layers():
    x = torch.randn(3)
    assert LayerReducedTensorParallel(8, 3).all_reduce(x) is x
    config, _ = tiny_config()
    model = build_parallel_model(config, 32, 2, torch.bfloat16, *fake_nxd_layers(SpmdWorld(2)))
    assert type(model.layers[0].self_attn.q_proj).__name__ == "ColumnParallelLinear"
    assert type(model.layers[0].mlp.down_proj).__name__ == "RowParallelLinear"
    assert model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    assert model.rope_cos.dtype == torch.float32


def test_a_tp_world_that_disagrees_with_the_degree_is_named():
    config, _ = tiny_config()
    with pytest.raises(ValueError, match=r"layers.0.self_attn.q_proj: .* differs from tp_degree 2"):
        build_parallel_model(config, 32, 2, torch.float32, *fake_nxd_layers(SpmdWorld(4)))


def full_checkpoint_in_nxd_layout(config: ModelConfig, state: dict, degree: int) -> dict:
    """The full checkpoint as NxD's sharding would take it: graph names, and (like NxD Inference's
    REPLICATE_TO_TP_DEGREE preshard) each KV head repeated so there is one per rank."""
    repeat = max(1, degree // config.num_key_value_heads)
    full = {}
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")) and repeat > 1:
            heads = tensor.view(config.num_key_value_heads, config.head_dim, *tensor.shape[1:])
            tensor = heads.repeat_interleave(repeat, dim=0).flatten(0, 1)
        full[MODEL_PREFIX + name] = tensor
    if config.tie_word_embeddings:
        full[MODEL_PREFIX + "lm_head.weight"] = state["embed_tokens.weight"]
    return full


@pytest.mark.parametrize(
    ("degree", "hf"),
    [(2, {}), (4, {}), (2, {"attention_bias": True, "tie_word_embeddings": True})],
    ids=["tp2", "tp4-replicated-kv", "tp2-biases-tied"],
)
def test_our_shards_are_what_nxd_would_shard(degree, hf):
    config, state = tiny_config(**hf)
    model = build_parallel_model(config, 32, degree, torch.float32, *fake_nxd_layers(SpmdWorld(degree)))
    full = full_checkpoint_in_nxd_layout(config, state, degree)
    ours = [shard_state_dict(config, state, degree, rank) for rank in range(degree)]
    for rank, weights in enumerate(rank_weights(ours, config, 32)):
        for name, param in model.named_parameters(remove_duplicate=False):
            expected = full[MODEL_PREFIX + name]
            if getattr(param, "tensor_model_parallel", False):  # NxD: split evenly, take this rank's part
                expected = expected.chunk(degree, dim=param.partition_dim)[rank]
            assert torch.equal(weights[MODEL_PREFIX + name], expected), (rank, name)
        assert weights[RANK_WEIGHT].tolist() == [rank] and weights[RANK_WEIGHT].dtype == torch.int32


# ---------------------------------------------------------------- the graphs' calling convention


def test_every_graph_has_its_own_input_shapes():
    config, _ = tiny_config()
    inputs = recipe_example_inputs(neuron_recipe(tp=2), config)
    assert list(inputs) == ["prefill_16", "prefill_32", "prefill_chunk_32", "decode_64", "decode_128"]
    layers, hd = config.num_hidden_layers, config.head_dim
    assert [tuple(t.shape) for t in inputs["decode_64"]] == [(4,), (4,), (layers, 4, 2, 64, hd), (layers, 4, 2, 64, hd)]
    assert tuple(inputs["prefill_chunk_32"][3].shape) == (layers, 2, 128, hd)
    assert all(t.dtype == torch.int32 for t in (*inputs["prefill_16"], *inputs["decode_128"][:2]))
    with pytest.raises(ValueError, match="graphs a and b take the same input shapes"):
        check_distinct_shapes({"a": inputs["decode_64"], "b": tuple(t.clone() for t in inputs["decode_64"])})


def test_each_rank_selects_its_heads_and_the_gather_restores_the_global_order():
    cache = torch.arange(2 * 4 * 3).view(2, 4, 3).float()  # [slots, 4 heads (2 ranks x 2), positions]
    per_rank = [select_local_heads(cache, 1, torch.tensor([rank], dtype=torch.int32), 2) for rank in range(2)]
    assert torch.equal(per_rank[1], cache[:, 2:4])
    # all_gather on the last dimension, in rank order, as NxD's gather_from_tensor_model_parallel_region
    keys = [part.transpose(1, 2).unsqueeze(-1) for part in per_rank]  # [slots, positions, 2 heads, hd=1]
    gathered = gather_heads(keys[0], lambda x: torch.cat([k.reshape(x.shape) for k in keys], dim=-1))
    assert torch.equal(gathered, cache.transpose(1, 2).unsqueeze(-1))


def test_visible_cores_must_match_the_tp_degree(monkeypatch):
    assert visible_core_count("3") == 1 and visible_core_count("8-15") == 8
    with pytest.raises(ValueError, match="expected one core index or a range"):
        visible_core_count("3-1")
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0-1")
    check_visible_cores(2)
    with pytest.raises(ValueError, match="names 2 NeuronCores, but the artifact was compiled for tp_degree 8"):
        check_visible_cores(8)


def test_the_graphs_never_leave_the_device(emulated_nxd):
    """torch-neuronx traces through XLA, which records device operations only: a ``.item()`` would bake
    the example input's value into the graph, and a tensor made on the CPU would not mix with device
    tensors. The meta device fails loudly on both, so every graph must run on it."""
    emulated_nxd(1)
    recipe, (config, _) = neuron_recipe(), tiny_config()
    factory = graph_factory(recipe, config)
    for name, inputs in recipe_example_inputs(recipe, config).items():
        with torch.no_grad():
            factory(name).to("meta")(*(t.to("meta") for t in inputs))


# ---------------------------------------------------------------- the runner, on the CPU


def write_artifact(directory: Path, recipe, loaded, graphs: list[GraphRecord] | None = None) -> ArtifactManifest:
    """An artifact as `compile_recipe` lays it out: our weight shards, then the graphs."""
    degree, weights = recipe.target.tp_degree, []
    (directory / "weights").mkdir(parents=True)
    for rank in range(degree):
        shard = stored_shard(loaded.config, loaded.state_dict, degree, rank)
        save_file(shard, directory / "weights" / f"rank{rank}.safetensors")
        weights.append(f"weights/rank{rank}.safetensors")
    if graphs is None:
        graphs = compile_for_neuron(recipe, loaded.config, directory)
    manifest = ArtifactManifest(recipe, loaded.config, {}, toolchain_versions(), weights, graphs)
    write_manifest(directory, manifest)
    return manifest


class CpuRoutedModel:
    """What `sdk.load_compiled` returns, on the CPU: per graph, one module per rank, built by the
    compile step's factory (with the default, here emulated, NxD layers) and given that rank's
    weights by name; a call goes to the graph whose input shapes it has, as NxD's router does, and
    returns rank 0's outputs."""

    EXTRA_WEIGHTS = {MODEL_PREFIX + "rope_cos", MODEL_PREFIX + "rope_sin"}  # buffers, not parameters

    def __init__(self, recipe, config: ModelConfig, weights: list[dict[str, torch.Tensor]], world: SpmdWorld):
        factory, self.world, self.graphs = graph_factory(recipe, config), world, {}
        for name, inputs in recipe_example_inputs(recipe, config).items():
            modules = [factory(name) for _ in weights]
            for module, its_weights in zip(modules, weights, strict=True):
                missing, unexpected = module.load_state_dict(its_weights, strict=False)
                assert not missing and set(unexpected) <= self.EXTRA_WEIGHTS, (missing, unexpected)
            self.graphs[str([list(t.shape) for t in inputs])] = modules

    def __call__(self, *inputs: torch.Tensor):
        modules = self.graphs[str([list(t.shape) for t in inputs])]
        return self.world.run(lambda rank: modules[rank](*inputs))[0]


@pytest.mark.parametrize(
    ("tp", "hf"),
    [
        (1, {}),
        (2, {}),
        (2, {"attention_bias": True, "tie_word_embeddings": True}),
        (4, {}),
    ],
    ids=["tp1", "tp2", "tp2-biases-tied", "tp4-replicated-kv"],
)
def test_the_runner_matches_the_eager_model_in_every_bucket(tmp_path, emulated_nxd, tp, hf):
    config, state = tiny_config(**hf)
    loaded, recipe, world = LoadedModel(config, state, None, tmp_path), neuron_recipe(tp), emulated_nxd(tp)
    graphs = [
        GraphRecord(name, spec.kind, spec.bucket, "graphs/nxd_model.pt", 0.0, 0, "", False)
        for name, spec in recipe_graphs(recipe).items()
    ]
    manifest = write_artifact(tmp_path / "artifact", recipe, loaded, graphs)

    def load(graphs_dir: Path, degree: int, weights):
        assert graphs_dir == tmp_path / "artifact" / "graphs" and degree == tp
        return CpuRoutedModel(recipe, config, weights, world)

    runner = NeuronRunner(tmp_path / "artifact", manifest, LoadTimes(), load=load)
    assert runner.cache.keys.shape[2] == cache_heads(config, tp)
    compare_with_eager(runner, loaded, recipe, tolerance=1e-4)


def compare_with_eager(runner, loaded, recipe, tolerance: float) -> None:
    eager = EagerRunner(build_model(loaded, recipe.shapes.max_seq_len), runner.graphs)
    graphs_run = set()
    for slot, prompt in enumerate(PROMPTS.values()):  # a whole prompt per step: the neuron family cuts it
        ours = runner.step(StepBatch(chunks=[PromptChunk(slot, 0, prompt)]))
        torch.testing.assert_close(ours.logits[0], run_prompt(eager, prompt, slot), atol=tolerance, rtol=0)
        graphs_run |= {use.graph for use in ours.uses}
    assert graphs_run == {"prefill_16", "prefill_32", "prefill_chunk_32"}
    for positions in ([11, 30, 50], [70, 30, 100]):  # decode_64, then decode_128
        batch = StepBatch([0, 1, 2], [7, 8, 9], positions)
        ours = runner.step(batch)
        torch.testing.assert_close(ours.logits, eager.step(batch).logits, atol=tolerance, rtol=0)
        graphs_run |= {use.graph for use in ours.uses}
    assert {"decode_64", "decode_128"} <= graphs_run


@pytest.mark.skipif(sdk.is_available(), reason="the Neuron SDK is installed here")
def test_compiling_for_neuron_without_the_sdk_names_the_packages(tmp_path, tiny_loaded):
    with pytest.raises(sdk.NeuronUnavailable, match="neuronx-distributed"):
        compile_for_neuron(neuron_recipe(), tiny_loaded.config, tmp_path)


# ---------------------------------------------------------------- on a NeuronCore


@pytest.mark.neuron
@pytest.mark.parametrize("tp", [1, 2])
def test_tiny_model_compiled_for_neuron_matches_the_cpu(tmp_path, tiny_loaded, tp, monkeypatch):
    pytest.importorskip("torch_neuronx", reason="Neuron SDK (torch-neuronx) is not installed: needs an Inf2/Trn1 host")
    pytest.importorskip("neuronx_distributed", reason="Neuron SDK (neuronx-distributed) is not installed")
    if not list(Path("/dev").glob("neuron*")):
        pytest.skip("no Neuron device (/dev/neuron*) on this host")
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0" if tp == 1 else "0-1")
    recipe = neuron_recipe(tp)
    manifest = write_artifact(tmp_path / "tiny-neuron", recipe, tiny_loaded)
    assert {Path(g.file).name for g in manifest.graphs} == {"nxd_model.pt"}
    runner = NeuronRunner(tmp_path / "tiny-neuron", manifest, LoadTimes())
    compare_with_eager(runner, tiny_loaded, recipe, tolerance=1e-2)
