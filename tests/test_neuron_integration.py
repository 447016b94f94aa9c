"""The Neuron compile and runner path.

Everywhere: the pure parts (which layers become column/row-parallel, that our weight shards are what
NxD's sharding would give, the graphs' calling convention, core counts) and the whole runner path on
the CPU, with stand-in parallel layers and a CPU stand-in for the loaded model that routes by input
shapes as NxD's does. Where the Neuron SDK and a NeuronCore exist: the tiny model compiled for real
at TP 1 and TP 2, against the CPU eager model.
"""

from __future__ import annotations

from pathlib import Path

import nxd_stand_in
import pytest
import torch
from conftest import tiny_recipe
from nxd_stand_in import SpmdWorld, fake_nxd_layers
from safetensors.torch import save_file

from neuron_serve.artifact.manifest import ArtifactManifest, toolchain_versions, write_manifest
from neuron_serve.backends.base import LoadTimes, run_prompt
from neuron_serve.backends.cpu.runners import EagerRunner
from neuron_serve.backends.neuron import sdk
from neuron_serve.backends.neuron.calling_convention import (
    CACHE_STATES,
    MODEL_PREFIX,
    STEP_INPUTS,
    check_distinct_shapes,
    example_inputs,
    rank_weights,
)
from neuron_serve.backends.neuron.compile import compile_for_neuron, graph_factory, recipe_graphs
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

PROMPTS = {16: list(range(3, 14)), 32: list(range(40, 70)), "chunked": [(i * 11) % 380 + 2 for i in range(90)]}


def neuron_recipe(tp: int = 1):
    # auto_cast none: fp32 on the NeuronCore too, so logits can be compared with the CPU's.
    changes = {"target.kind": "neuron", "target.instance": "inf2.xlarge", "target.tp_degree": tp}
    return tiny_recipe(**changes, **{"compiler.auto_cast": "none"})


def tiny_config(**hf_overrides) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    hf = dict(TINY_CONFIG, **hf_overrides)
    state = {k.removeprefix("model."): v for k, v in random_state_dict(hf, seed=1).items()}
    return ModelConfig.from_hf(hf), state


@pytest.fixture
def emulated_nxd(monkeypatch):
    """Installs the NxD stand-in (``nxd_stand_in.py``) for a TP world of the given degree."""
    return lambda degree: nxd_stand_in.install(monkeypatch, degree)


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


# ---------------------------------------------------------------- the graphs' calling convention


def test_every_graph_takes_one_argument_list_and_its_own_shapes():
    graphs = recipe_graphs(neuron_recipe(tp=2))  # batch 4, context (16, 32), KV (64, 128)
    inputs = example_inputs(graphs)
    decode_only = [f"step_{rows}x1x1x{kv}" for kv in (64, 128) for rows in (1, 2, 4)]
    with_prompts = [f"step_4x{tokens}x4x{kv}" for kv in (64, 128) for tokens in (16, 32)]
    assert list(inputs) == decode_only + with_prompts
    assert {len(tensors) for tensors in inputs.values()} == {len(STEP_INPUTS)}
    assert all(t.dtype == torch.int32 for tensors in inputs.values() for t in tensors)
    # P segments and cached lengths, L key positions (the KV bucket), S + P writes
    shapes = [[4], [4], [16], [16], [1], [16], [16], [128], [4], [20], [20]]
    assert [list(t.shape) for t in inputs["step_4x16x4x128"]] == shapes
    with pytest.raises(ValueError, match="graphs a and b take the same input shapes"):
        check_distinct_shapes({"a": inputs["step_1x1x1x64"], "b": inputs["step_1x1x1x64"]})


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
    module = graph_factory(recipe, config)().to("meta")
    for inputs in example_inputs(recipe_graphs(recipe)).values():
        with torch.no_grad():
            logits, k_cache, v_cache = module(*(t.to("meta") for t in inputs))
        assert (k_cache.shape, v_cache.dtype) == (module.k_cache.shape, module.v_cache.dtype), "aliased in place"


@pytest.mark.parametrize(("tp", "local_heads"), [(1, 2), (2, 1), (4, 1)], ids=["tp1", "tp2", "tp4-replicated"])
def test_each_rank_holds_only_its_own_kv_heads(emulated_nxd, tp, local_heads):
    emulated_nxd(tp)
    config, _ = tiny_config()  # 2 KV heads
    module = graph_factory(neuron_recipe(tp), config)()
    shape = (config.num_hidden_layers, 4 + 1, local_heads, 128, config.head_dim)  # 4 slots and the scratch row
    assert tuple(module.k_cache.shape) == tuple(module.v_cache.shape) == shape
    assert module.cache_aliases() == {module.k_cache: 1, module.v_cache: 2}
    assert [name for name, _ in module.named_parameters() if "cache" in name] == list(CACHE_STATES)


def test_the_shipped_llama_recipe_holds_one_eighth_of_the_kv_cache_per_core(monkeypatch):
    from neuron_serve.recipe.files import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "compile" / "llama-3.1-8b-inf2.48xlarge.toml")
    hf = {**TINY_CONFIG, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8}
    hf.update(intermediate_size=14336, num_hidden_layers=32, vocab_size=128256)
    nxd_stand_in.install(monkeypatch, recipe.target.tp_degree)
    with torch.device("meta"):
        module = graph_factory(recipe, ModelConfig.from_hf(hf))()
    assert tuple(module.k_cache.shape) == (32, recipe.shapes.batch_size + 1, 8 // 8, 4096, 128)
    assert module.k_cache.dtype == torch.bfloat16


# ---------------------------------------------------------------- the runner, on the CPU


def write_artifact(directory: Path, recipe, loaded) -> ArtifactManifest:
    """An artifact as `compile_recipe` lays it out: our weight shards, then the graphs."""
    degree, weights = recipe.target.tp_degree, []
    (directory / "weights").mkdir(parents=True)
    for rank in range(degree):
        shard = stored_shard(loaded.config, loaded.state_dict, degree, rank)
        save_file(shard, directory / "weights" / f"rank{rank}.safetensors")
        weights.append(f"weights/rank{rank}.safetensors")
    graphs = compile_for_neuron(recipe, loaded.config, directory)
    manifest = ArtifactManifest(recipe, loaded.config, {}, toolchain_versions(), weights, graphs)
    write_manifest(directory, manifest)
    return manifest


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
def test_compiled_and_loaded_through_model_builder_the_runner_matches_the_eager_model(tmp_path, emulated_nxd, tp, hf):
    """compile_for_neuron and NeuronRunner through the ModelBuilder stand-in: one traced signature, the
    router, the cache as states. Every step of the engine's kinds goes through the same call."""
    config, state = tiny_config(**hf)
    loaded, recipe = LoadedModel(config, state, None, tmp_path), neuron_recipe(tp)
    emulated_nxd(tp)
    manifest = write_artifact(tmp_path / "artifact", recipe, loaded)
    assert [g.name for g in manifest.graphs] == list(example_inputs(recipe_graphs(recipe)))
    runner = NeuronRunner(tmp_path / "artifact", manifest, LoadTimes())
    compare_with_eager(runner, loaded, recipe, tolerance=1e-4)
    calls = runner.model.nxd_model.calls
    largest = max(t.numel() for call in calls for t in call)
    assert largest <= 128, "no call carries the KV cache, nor a mask: the largest input is the KV positions"
    assert {len(call) for call in calls} == {len(STEP_INPUTS)}


def compare_with_eager(runner, loaded, recipe, tolerance: float) -> None:
    eager = EagerRunner(build_model(loaded, recipe.shapes.max_seq_len), runner.graphs)
    for slot, prompt in enumerate(PROMPTS.values()):  # whole prompts, the longest over two steps
        torch.testing.assert_close(
            run_prompt(runner, prompt, slot), run_prompt(eager, prompt, slot), atol=tolerance, rtol=0
        )
    for positions in ([11, 30, 50], [70, 30, 100]):  # KV bucket 64, then 128
        batch = StepBatch([0, 1, 2], [7, 8, 9], positions)
        torch.testing.assert_close(runner.step(batch).logits, eager.step(batch).logits, atol=tolerance, rtol=0)
    # decode rows beside a new prompt and a continued one, in one step (a static prompt graph at full batch)
    mixed = StepBatch([0, 2], [5, 6], [101, 51], [PromptChunk(1, 30, [4, 5, 6]), PromptChunk(3, 0, [9] * 7)])
    ours, theirs = runner.step(mixed), eager.step(mixed)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=tolerance, rtol=0)
    after = StepBatch([0, 1, 2, 3], [1, 2, 3, 4], [102, 33, 52, 7])  # reads every row the mixed step wrote
    torch.testing.assert_close(runner.step(after).logits, eager.step(after).logits, atol=tolerance, rtol=0)


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
    assert [g.name for g in manifest.graphs] == list(example_inputs(recipe_graphs(recipe)))
    runner = NeuronRunner(tmp_path / "tiny-neuron", manifest, LoadTimes())
    compare_with_eager(runner, tiny_loaded, recipe, tolerance=1e-2)
