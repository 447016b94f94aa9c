"""Memory per NeuronCore: a rank's weights and KV cache against its HBM, in `recipe validate` and as a rule."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import tomli_w

from neuron_serve.cli import main
from neuron_serve.model.config import ModelConfig
from neuron_serve.recipe.files import load_recipe, recipe_from_dict
from neuron_serve.recipe.memory import GIB, RUNTIME_RESERVE, core_memory, memory_errors
from neuron_serve.recipe.schema import RecipeError
from neuron_serve.recipe.validation import recipe_errors

COMPILE_DIR = Path(__file__).resolve().parent.parent / "compile"
LLAMA_RECIPE = COMPILE_DIR / "llama-3.1-8b-inf2.48xlarge.toml"
LLAMA_CONFIG = COMPILE_DIR / "llama-3.1-8b-instruct.config.json"


def llama_hf() -> dict:
    return json.loads(LLAMA_CONFIG.read_text())


def llama_recipe(**changes):
    """The shipped Llama recipe with `section.field=value` changes."""
    recipe = load_recipe(LLAMA_RECIPE)
    for dotted, value in changes.items():
        section, name = dotted.split(".")
        setattr(recipe, section, dataclasses.replace(getattr(recipe, section), **{name: value}))
    return recipe


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def by_hand(hf: dict, tp: int, slots: int, seq: int, itemsize: int = 2) -> tuple[int, int, int]:
    """(decoder layers, replicated weights, KV cache) of one rank, in bytes, from config.json alone.
    The device cache has a row per slot and one more, the scratch row that pad tokens write."""
    h, inter, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    hd = h // hf["num_attention_heads"]
    q_out = hf["num_attention_heads"] // tp * hd
    kv_heads = max(1, hf["num_key_value_heads"] // tp)  # one replicated head when fewer KV heads than ranks
    per_layer = h * q_out + 2 * h * kv_heads * hd + q_out * h + 3 * h * (inter // tp) + 2 * h  # q k v o, MLP, norms
    replicated = 2 * hf["vocab_size"] * h + h  # embeddings, lm_head, final norm
    kv = 2 * layers * (slots + 1) * kv_heads * seq * hd * itemsize
    return layers * per_layer * itemsize, replicated * itemsize, kv


def test_the_shipped_llama_recipe_names_its_config_and_fits_with_room():
    recipe = load_recipe(LLAMA_RECIPE)
    assert (COMPILE_DIR / recipe.model.config) == LLAMA_CONFIG
    config = ModelConfig.from_hf(llama_hf())
    m = core_memory(recipe, config)
    layers, replicated, kv = by_hand(llama_hf(), tp=8, slots=16, seq=4096)
    assert (m.layer_weights, m.replicated_weights, m.kv_cache) == (layers, replicated, kv)
    assert m.kv_cache == GIB * 17 // 16  # the recipe's comment: 1 KV head of 8, 16 KiB per token, 16 slots + 1
    assert m.hbm == 16 * GIB and m.reserve == RUNTIME_RESERVE == GIB
    assert m.headroom == 16 * GIB - layers - replicated - kv - GIB
    assert memory_errors(recipe, config) == []


def test_cli_validate_prints_the_per_core_table_with_no_option(capsys):
    assert main(["recipe", "validate", str(LLAMA_RECIPE)]) == 0
    out = capsys.readouterr().out
    layers, replicated, kv = by_hand(llama_hf(), tp=8, slots=16, seq=4096)
    assert out.startswith("Memory per NeuronCore (one of 8 TP ranks):\n")
    lines = {line[:19].strip(): line for line in out.splitlines()[1:-1]}  # by row name
    assert gib(layers + replicated) in lines["weights"] and gib(replicated) in lines["replicated"]
    assert gib(kv) in lines["KV cache"] and "1 of 8 KV heads" in lines["KV cache"]
    assert "1.00 GiB" in lines["runtime reserve"] and "16.00 GiB" in lines["HBM"]
    assert gib(16 * GIB - layers - replicated - kv - GIB) in lines["headroom"]
    assert out.endswith(f"OK: {LLAMA_RECIPE}\n")


def test_a_layout_that_does_not_fit_is_rejected_with_its_numbers(tmp_path):
    d = llama_recipe(**{"target.tp_degree": 1}).to_dict()  # the 8B model in bf16 on one core
    config = ModelConfig.from_hf(llama_hf())
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(d, model_config=config)
    layers, replicated, kv = by_hand(llama_hf(), tp=1, slots=16, seq=4096)
    (error,) = info.value.errors
    assert error.startswith("target.tp_degree: at tp_degree 1 one NeuronCore of inf2.48xlarge needs")
    total = layers + replicated + kv + GIB
    for number in (gib(layers + replicated), gib(kv), gib(total), "16.00 GiB", gib(total - 16 * GIB)):
        assert number in error, number
    assert "raise target.tp_degree (to 2 or 4 or 8 or 24)" in error and "lower shapes.batch_size" in error
    assert "quantization.method int8-weight or fp8-weight" in error
    path = tmp_path / "tp1.toml"
    path.write_text(tomli_w.dumps(d))
    with pytest.raises(RecipeError, match="one NeuronCore of inf2.48xlarge needs"):
        load_recipe(path, model_config=config)


def test_cli_validate_rejects_it_too_and_the_heads_only_config_skips_memory(tmp_path, capsys):
    d = llama_recipe(**{"target.tp_degree": 1}).to_dict()
    d["model"]["config"] = str(LLAMA_CONFIG)  # an absolute path stays as it is
    path = tmp_path / "tp1.toml"
    path.write_text(tomli_w.dumps(d))
    assert main(["recipe", "validate", str(path)]) == 1
    assert "more than its 16.00 GiB of HBM" in capsys.readouterr().err
    heads = tmp_path / "heads.json"
    heads.write_text('{"num_attention_heads": 32, "num_key_value_heads": 8}')
    assert main(["recipe", "validate", str(path), "--model-config", str(heads)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Memory per NeuronCore: not checked: ") and "is not supported" in out


def test_kv_heads_fewer_than_ranks_are_replicated_one_per_rank():
    hf = dict(llama_hf(), num_key_value_heads=2)  # 2 KV heads on 8 ranks
    config = ModelConfig.from_hf(hf)
    m = core_memory(llama_recipe(), config)
    layers, _, kv = by_hand(hf, tp=8, slots=16, seq=4096)
    assert m.kv_heads == 1 and m.kv_cache == kv == GIB * 17 // 16  # as with 8 KV heads: each rank keeps one
    assert m.layer_weights == layers  # k/v projections: one head's rows per rank, not 2/8 of one


def test_int8_weights_are_a_byte_each_plus_an_fp32_scale_per_output_row():
    hf = llama_hf()
    recipe = llama_recipe(**{"quantization.method": "int8-weight"})  # lm_head stays bf16 (quantization.skip)
    m = core_memory(recipe, ModelConfig.from_hf(hf))
    h, inter, hd, tp = hf["hidden_size"], hf["intermediate_size"], 128, 8
    q_out, inter_out = hf["num_attention_heads"] // tp * hd, inter // tp
    # (rows, inputs) of each linear layer on one rank: o and down are cut along their inputs, so they
    # keep every output row, and its scale.
    shapes = [(q_out, h), (hd, h), (hd, h), (h, q_out), (inter_out, h), (inter_out, h), (h, inter_out)]
    per_layer = sum(rows * inputs + 4 * rows for rows, inputs in shapes) + 2 * h * 2  # the norms stay bf16
    assert m.layer_weights == hf["num_hidden_layers"] * per_layer
    assert m.replicated_weights == by_hand(hf, tp, 16, 4096)[1]


def test_a_local_source_directory_gives_its_config(tmp_path, capsys):
    model_dir = tmp_path / "llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(LLAMA_CONFIG.read_text())
    d = llama_recipe(**{"model.source": str(model_dir), "model.config": ""}).to_dict()
    path = tmp_path / "local.toml"
    path.write_text(tomli_w.dumps(d))
    assert main(["recipe", "validate", str(path)]) == 0
    assert "Memory per NeuronCore (one of 8 TP ranks):" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("changes", "note"),
    [
        ({"model.config": ""}, "not checked: no model config; pass --model-config"),
        ({"model.config": str(LLAMA_CONFIG), "model.dtype": "auto"}, "not checked: model.dtype is auto"),
    ],
)
def test_validate_says_when_memory_is_not_checked(tmp_path, capsys, changes, note):
    d = llama_recipe(**changes).to_dict()
    path = tmp_path / "r.toml"
    path.write_text(tomli_w.dumps(d))
    assert main(["recipe", "validate", str(path)]) == 0
    assert note in capsys.readouterr().out


def test_cpu_recipes_have_no_memory_rule_or_table(capsys):
    config = ModelConfig.from_hf(llama_hf())
    tiny = load_recipe(COMPILE_DIR / "tiny-cpu.toml")
    assert recipe_errors(tiny, config) == [], "a host's memory is not a recipe rule"
    assert main(["recipe", "validate", str(COMPILE_DIR / "tiny-cpu.toml")]) == 0
    assert capsys.readouterr().out.startswith("OK: ")


def test_model_config_is_not_a_compile_field():
    recipe = llama_recipe()
    other = copy.deepcopy(recipe)
    other.model.config = "elsewhere.json"
    assert other.compile_fields() == recipe.compile_fields() and "config" not in recipe.compile_fields()["model"]


def test_the_nki_mlp_kernel_needs_each_ranks_intermediate_size_in_tiles_of_128():
    recipe = llama_recipe(**{"kernels.enabled": ["swiglu_mlp"]}).to_dict()
    recipe_from_dict(recipe, model_config=ModelConfig.from_hf(llama_hf()))  # 14336 / 8 = 14 x 128
    odd = ModelConfig.from_hf({**llama_hf(), "intermediate_size": 14000})
    with pytest.raises(RecipeError, match=r"'swiglu_mlp' kernel tiles .* 14000 / tp_degree 8 = 1750 is not a multiple"):
        recipe_from_dict(recipe, model_config=odd)
