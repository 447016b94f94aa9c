"""Weight quantization: each method's model computes with exactly its stored weights, its compiled graph
matches its eager model, its shards reassemble, its artifact reloads verified, and a recipe asking a
target for a method it cannot run is refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, tiny_recipe
from gguf import GGMLQuantizationType
from gguf_export import export_gguf
from safetensors.torch import load_file
from test_sharding import reassemble

from neuron_serve.artifact.manifest import CorruptArtifactError, read_manifest
from neuron_serve.backends.base import LoadTimes, run_decode, run_prompt
from neuron_serve.backends.cpu.runners import EagerRunner, open_rank_runner
from neuron_serve.backends.registry import open_runner
from neuron_serve.compiler.compile import compile_recipe
from neuron_serve.compiler.quality import evaluate
from neuron_serve.model.quantization import (
    QuantSpec,
    bf16_copy_bytes,
    dequantize,
    dequantize_state_dict,
    quantize_state_dict,
)
from neuron_serve.model.sharding import shard_state_dict
from neuron_serve.model.state import model_from_state_dict, stored_shard
from neuron_serve.recipe.schema import RecipeError
from neuron_serve.recipe.validation import validate_recipe
from neuron_serve.weights.loader import load_model_files
from neuron_serve.weights.tiny import write_tiny_model

CPU_METHODS = ("int8-weight", "int8-dynamic", "int4-weight")
PROMPT = list(range(3, 40))


def logits_of(runner) -> torch.Tensor:
    first = run_prompt(runner, PROMPT, 0)
    second = run_prompt(runner, PROMPT[5:20], 1)
    decoded = run_decode(runner, [0, 1], [7, 8], [len(PROMPT), 15])
    return torch.cat([first[None], second[None], decoded])


@pytest.mark.parametrize("method", CPU_METHODS)
def test_a_quantized_model_computes_with_exactly_its_stored_weights(tiny_loaded, method):
    """int8 and int4 weight-only equal the float model of the dequantized weights; int8-dynamic also
    rounds each token's activations to 8 bits, so it is close to it, not equal."""
    spec = QuantSpec(method, 32, ("embed_tokens",))
    state = quantize_state_dict(tiny_loaded.state_dict, spec)
    assert state["layers.0.mlp.up_proj.weight"].dtype == (torch.uint8 if method == "int4-weight" else torch.int8)
    assert "lm_head.scale" in state and "embed_tokens.scale" not in state
    assert state["lm_head.weight"].dtype == torch.int8  # int4-weight keeps lm_head at 8 bits
    if method == "int4-weight":
        assert state["layers.0.mlp.up_proj.scale"].dtype == state["layers.0.mlp.up_proj.zero"].dtype == torch.float16
    config = tiny_loaded.config
    quantized = model_from_state_dict(config, stored_shard(config, state, 1, 0), 64, quantization=spec)
    reference = model_from_state_dict(config, stored_shard(config, dequantize_state_dict(state, spec), 1, 0), 64)
    tokens = torch.tensor([PROMPT[:30]])
    with torch.inference_mode():
        ours, theirs = quantized.prompt_logits(tokens), reference.prompt_logits(tokens)
    if method == "int8-dynamic":
        assert torch.nn.functional.cosine_similarity(ours, theirs, dim=-1).min() > 0.99
    else:
        assert (ours - theirs).abs().max() < 1e-4


def test_quantization_error_is_small_against_the_float_weights(tiny_loaded):
    weight = tiny_loaded.state_dict["layers.0.mlp.down_proj.weight"]
    for method, bound in (("int8-weight", 0.01), ("int4-weight", 0.2)):
        spec = QuantSpec(method, 32)
        stored = quantize_state_dict({"layers.0.mlp.down_proj.weight": weight}, spec)
        parts = {k.rsplit(".", 1)[1]: v for k, v in stored.items()}
        error = (dequantize(parts, spec) - weight).abs().max() / weight.abs().max()
        assert 0 < error < bound, method


@pytest.fixture(scope="module", params=CPU_METHODS)
def quantized_artifact(request, tmp_path_factory):
    method = request.param
    out = tmp_path_factory.mktemp(method) / "artifact"
    return method, compile_recipe(tiny_recipe(**{"quantization.method": method}), out).out_dir


def test_the_compiled_graph_matches_its_eager_model(quantized_artifact):
    method, directory = quantized_artifact
    manifest = read_manifest(directory)
    assert manifest.recipe.quantization.method == method
    aot = open_rank_runner(directory, manifest, 0, LoadTimes())
    shard = load_file(directory / manifest.weights[0])
    spec = QuantSpec.of(manifest.recipe.quantization)
    model = model_from_state_dict(manifest.model_config, shard, manifest.recipe.shapes.max_seq_len, quantization=spec)
    assert (logits_of(aot) - logits_of(EagerRunner(model, aot.graphs))).abs().max() < 1e-4


def test_a_quantized_artifact_reloads_verified_and_refuses_a_changed_byte(quantized_artifact, tmp_path):
    method, directory = quantized_artifact
    manifest = read_manifest(directory)
    quality = {row["method"]: row for row in manifest.quality}
    assert set(quality) == {"none", method} and quality[method]["greedy_agreement"] > 0.5
    runner, _ = open_runner(directory)
    expected = logits_of(runner)
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in directory.rglob("*"):
        if item.is_file():
            target = copy / item.relative_to(directory)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(item.read_bytes())
    reloaded, _ = open_runner(copy)
    assert torch.equal(logits_of(reloaded), expected)
    shard = copy / manifest.weights[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 1
    shard.write_bytes(data)
    with pytest.raises(CorruptArtifactError, match="rank0.safetensors"):
        open_runner(copy)


@pytest.mark.parametrize("method", ["int8-weight", "int4-weight"])
def test_tensor_parallel_shards_of_quantized_weights_reassemble_exactly(tmp_path, method):
    loaded = load_model_files(str(write_tiny_model(tmp_path / "m", seed=2, hidden_size=128, intermediate_size=256)))
    spec = QuantSpec(method, 32, ("embed_tokens",))
    state = quantize_state_dict(loaded.state_dict, spec)
    shards = [shard_state_dict(loaded.config, state, 2, rank) for rank in range(2)]
    for name, tensor in state.items():
        assert torch.equal(reassemble(loaded.config, shards, name), tensor), name
    scale = "layers.0.mlp.down_proj.scale"  # row-parallel: whole per channel, cut per group
    assert shards[0][scale].shape[1] == (1 if method == "int8-weight" else 256 // 32 // 2)


def test_tensor_parallel_ranks_of_a_quantized_model_match_a_single_rank(tmp_path):
    changes = {"quantization.method": "int8-weight", "compiler.cpu_mode": "eager"}
    single = compile_recipe(tiny_recipe(**changes), tmp_path / "tp1")
    parallel = compile_recipe(tiny_recipe(**changes, **{"target.tp_degree": 2}), tmp_path / "tp2")
    one, _ = open_runner(single.out_dir)
    two, _ = open_runner(parallel.out_dir)
    try:
        assert (logits_of(two) - logits_of(one)).abs().max() < 1e-4
    finally:
        two.close()


def test_gguf_q4_codes_are_served_as_they_are(tiny_dir, tmp_path):
    path = export_gguf(tiny_dir, tmp_path / "q4.gguf", GGMLQuantizationType.Q4_1)
    loaded = load_model_files(str(path))
    spec = QuantSpec("int4-weight", 32)
    kept = loaded.kept_quantization(spec)
    assert "layers.1.self_attn.k_proj" in kept and not loaded.kept_quantization(QuantSpec("int4-weight", 64))
    for layer, stored in kept.items():  # the file's own values, q/k rows unpermuted with the floats
        assert torch.equal(dequantize(stored, spec), loaded.state_dict[f"{layer}.weight"]), layer
    (quality,) = evaluate(loaded, [spec], prompts=4, new_tokens=8, window=64)[1:]
    assert quality.perplexity_increase == 0 and quality.greedy_agreement == 1


def test_quality_of_the_unquantized_model_against_itself(tiny_loaded):
    none, same, int4 = evaluate(tiny_loaded, [QuantSpec("none"), QuantSpec("int4-weight", 32)], 4, 8, 64)
    assert none.tokens > 100 and same.perplexity == none.perplexity and same.greedy_agreement == 1
    assert int4.perplexity != none.perplexity


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"quantization.method": "fp8-weight"}, "'fp8-weight' is not supported on target 'cpu'"),
        ({"quantization.method": "int4"}, "quantization.method: must be one of none, int8-weight"),
        ({"quantization.method": "int4-weight", "quantization.group_size": 48}, "quantization.group_size"),
        ({"quantization.method": "int8-weight", "quantization.skip": ["lm_hed"]}, "'lm_hed' names no layer"),
        (
            {"quantization.method": "int8-weight", "kernels.enabled": ["swiglu_mlp"]},
            "'swiglu_mlp' reads float weights",
        ),
    ],
)
def test_a_method_a_target_cannot_run_is_refused_by_name(changes, message):
    with pytest.raises(RecipeError, match=message):
        validate_recipe(tiny_recipe(**changes))


def test_neuron_runs_int8_and_fp8_weights_only_and_int4_groups_must_fit_a_rank(tiny_loaded):
    neuron = {"target.kind": "neuron", "target.instance": "inf2.xlarge", "target.tp_degree": 2}
    for method in ("int4-weight", "int8-dynamic"):
        with pytest.raises(RecipeError, match=f"'{method}' is not supported on target 'neuron'"):
            validate_recipe(tiny_recipe(**neuron, **{"quantization.method": method}))
    validate_recipe(tiny_recipe(**neuron, **{"quantization.method": "fp8-weight"}))
    with pytest.raises(RecipeError, match="must list lm_head on neuron"):
        validate_recipe(tiny_recipe(**neuron, **{"quantization.method": "int8-weight", "quantization.skip": []}))
    tp2 = tiny_recipe(**{"quantization.method": "int4-weight", "target.tp_degree": 2, "compiler.cpu_mode": "eager"})
    with pytest.raises(RecipeError, match=r"does not divide the model's intermediate_size / tp_degree \(80\)"):
        validate_recipe(tp2, tiny_loaded.config)


def test_eval_command_prints_a_row_per_method_and_refuses_an_unknown_one(capsys):
    from neuron_serve.cli import main

    recipe = str(REPO / "compile" / "tiny-cpu.toml")
    small = ["--prompts", "2", "--new-tokens", "4", "--window", "32"]
    assert main(["eval", recipe, "--methods", "int8-weight,int4-weight", "--skip", "embed_tokens", *small]) == 0
    table = capsys.readouterr().err
    assert all(name in table for name in ("none", "int8-weight", "int4-weight", "greedy agreement"))
    assert main(["eval", recipe, "--methods", "int3"]) == 2
    assert "--methods: unknown int3" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["int8-weight", "int4-weight"])
def test_bf16_weight_copies_are_counted_two_bytes_per_quantized_weight(tiny_loaded, method):
    spec = QuantSpec(method, 32, ("embed_tokens",))
    state = quantize_state_dict(tiny_loaded.state_dict, spec)
    weights = sum(
        tiny_loaded.state_dict.get(f"{layer}.weight", tiny_loaded.state_dict["embed_tokens.weight"]).numel()
        for layer in (name.removesuffix(".scale") for name in state if name.endswith(".scale"))
    )
    assert bf16_copy_bytes(state, spec, torch.bfloat16) == 2 * weights
    assert bf16_copy_bytes(state, spec, torch.float32) == 0
    assert bf16_copy_bytes(state, QuantSpec("int8-dynamic", 32, ("embed_tokens",)), torch.bfloat16) == 0
