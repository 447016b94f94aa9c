"""Recipes: shipped files load, every rule names its field, save/load round-trips."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomli_w
from conftest import tiny_recipe

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.recipe.cli import add_recipe_parser
from neuron_serve.recipe.files import load_recipe, recipe_from_dict, save_recipe
from neuron_serve.recipe.schema import Recipe, RecipeError
from neuron_serve.recipe.validation import known_kernels, recipe_errors, validate_recipe

COMPILE_DIR = Path(__file__).resolve().parent.parent / "compile"
SHIPPED = sorted(COMPILE_DIR.glob("*.toml"))


def neuron_dict() -> dict:
    return load_recipe(COMPILE_DIR / "llama-3.1-8b-inf2.48xlarge.toml").to_dict()


def cpu_dict() -> dict:
    return load_recipe(COMPILE_DIR / "tiny-cpu.toml").to_dict()


def errors_of(d: dict, model_config=None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(d, model_config=model_config)
    return info.value.errors


def with_(d: dict, dotted: str, value) -> dict:
    d = copy.deepcopy(d)
    *path, last = dotted.split(".")
    node = d
    for part in path:
        node = node[part]
    node[last] = value
    return d


def test_shipped_recipes_exist_and_validate():
    names = {p.stem for p in SHIPPED}
    assert {"smollm2-135m-cpu", "tiny-cpu", "llama-3.1-8b-inf2.48xlarge"} <= names
    for path in SHIPPED:
        recipe = load_recipe(path)
        assert recipe.name == path.stem  # the file name is the recipe name
        assert recipe_errors(recipe) == []


def test_the_default_recipe_serves_32_streams_and_leaves_prompts_room_in_every_step():
    r = load_recipe(COMPILE_DIR / "smollm2-135m-cpu.toml")
    assert r.model.dtype == "auto" and r.target.kind == "cpu" and r.shapes.batch_size >= 32
    graphs = GraphSet.from_shapes(r.shapes)
    assert graphs.batch_buckets[0] == 1 and graphs.batch_buckets[-1] == r.shapes.batch_size
    assert graphs.prompt_budget(r.shapes.batch_size) > 0, "prompts still go in while every slot decodes"


def test_step_shapes_are_checked_and_each_error_names_its_field():
    errors = recipe_errors(
        tiny_recipe(**{"shapes.batch_buckets": [1, 2], "shapes.token_budget": 5, "model.dtype": "fp8"})
    )
    assert any(
        e.startswith("shapes.batch_buckets: the largest bucket must equal shapes.batch_size (4)") for e in errors
    )
    assert any(e.startswith("shapes.token_budget: must be 0 (automatic) or at least") and "20" in e for e in errors)
    assert any(e.startswith("model.dtype: must be one of float32, bfloat16, float16, auto") for e in errors)


def test_default_recipe_fits_smollm2_heads():
    smollm2 = SimpleNamespace(num_attention_heads=9, num_key_value_heads=3)
    validate_recipe(load_recipe(COMPILE_DIR / "smollm2-135m-cpu.toml"), smollm2)


def test_llama_example_fits_llama_8b_heads():
    llama = SimpleNamespace(num_attention_heads=32, num_key_value_heads=8)
    validate_recipe(load_recipe(COMPILE_DIR / "llama-3.1-8b-inf2.48xlarge.toml"), llama)


def test_save_load_round_trip(tmp_path):
    original = load_recipe(COMPILE_DIR / "llama-3.1-8b-inf2.48xlarge.toml")
    original.compiler.extra_flags = ["--logfile=/tmp/a, b].txt", '--tag="x"']  # commas, brackets, quotes
    path = tmp_path / "sub" / "copy.toml"
    save_recipe(original, path, comment="two\nlines")
    text = path.read_text()
    assert text.startswith("# two\n# lines\n")
    assert "context_buckets = [128, 512, 1024, 2048, 4096]\n" in text  # one line per list: readable diffs
    assert load_recipe(path) == original


def test_compile_fields_exclude_serving_only_settings():
    r = load_recipe(COMPILE_DIR / "tiny-cpu.toml")
    fields = r.compile_fields()
    assert set(fields) == {"model", "target", "shapes", "kernels", "quantization", "compiler"}
    other = recipe_from_dict(with_(with_(r.to_dict(), "serve.port", 9999), "version", 7))
    assert other.compile_fields() == fields  # serve/version changes never force a recompile
    assert recipe_from_dict(with_(r.to_dict(), "shapes.batch_size", 2)).compile_fields() != fields


def test_missing_keys_take_documented_defaults():
    r = recipe_from_dict({"name": "minimal"})
    assert r == Recipe(name="minimal")
    assert r.serve.max_waiting == 256 and r.compiler.optlevel == 2


@pytest.mark.parametrize(
    "dotted,bad,expected",
    [
        (
            "shapes.context_buckets",
            [512, 128],
            "shapes.context_buckets: must be strictly increasing, got [512, 128]",
        ),
        ("shapes.context_buckets", [], "shapes.context_buckets: must not be empty"),
        ("shapes.token_buckets", [0, 128], "shapes.token_buckets: every bucket must be positive"),
        (
            "shapes.context_buckets",
            [16, 256],
            "shapes.context_buckets: every bucket must be <= shapes.max_seq_len",
        ),
        (
            "shapes.token_buckets",
            [32, 64],
            "shapes.token_buckets: the largest bucket must equal shapes.max_seq_len",
        ),
        ("shapes.batch_size", 0, "shapes.batch_size: must be >= 1, got 0"),
        ("model.dtype", "fp16", "model.dtype: must be one of float32, bfloat16, float16, auto, got 'fp16'"),
        ("model.source", "hf://meta-llama/x", "model.source: only local paths"),
        ("model.source", "s3://", "model.source: must look like s3://bucket/prefix"),
        ("target.kind", "gpu", "target.kind: must be one of cpu, neuron"),
        ("compiler.cpu_mode", "jit", "compiler.cpu_mode: must be one of aot, eager"),
        ("compiler.auto_cast", "matmul", "compiler.auto_cast: must be one of none, matmult, all"),
        (
            "compiler.auto_cast_type",
            "fp8",
            "compiler.auto_cast_type: must be one of bf16, fp16, tf32, fp8_e4m3",
        ),
        ("compiler.optlevel", 4, "compiler.optlevel: must be one of 1, 2, 3, got 4"),
        ("compiler.extra_flags", ["O3"], "compiler.extra_flags: every entry must be a flag"),
        ("quantization.method", "int8", "quantization.method: must be one of none, int8-weight"),
        ("kernels.enabled", ["flash"], "kernels.enabled: unknown kernel 'flash'"),
        ("kernels.enabled", ["qkv_rope", "qkv_rope"], "kernels.enabled: names must not repeat"),
        ("serve.port", 70000, "serve.port: must be in 1..65535"),
        ("name", "my recipe", "name: must be letters, digits"),
    ],
)
def test_each_rule_names_field_and_rule(dotted, bad, expected):
    errors = errors_of(with_(cpu_dict(), dotted, bad))
    assert any(e.startswith(expected) for e in errors), errors


def test_all_errors_reported_together():
    d = with_(with_(cpu_dict(), "shapes.batch_size", 0), "compiler.optlevel", 9)
    d = with_(d, "shapes.context_buckets", [32, 16])
    errors = errors_of(d)
    assert len(errors) == 3
    message = str(RecipeError(errors))
    assert "shapes.batch_size" in message and "compiler.optlevel" in message and "context_buckets" in message


def test_unknown_keys_and_sections_are_errors_listing_allowed_keys():
    d = with_(cpu_dict(), "compiler.optlvl", 3)
    d["kernel"] = {"enabled": []}
    errors = errors_of(d)
    assert any(e.startswith("compiler.optlvl: unknown key; allowed keys: cpu_mode, model_type") for e in errors)
    assert any(e.startswith("kernel: unknown key or section; allowed: name, version, model") for e in errors)


def test_wrong_types_are_errors_not_coerced():
    errors = errors_of(with_(with_(cpu_dict(), "shapes.batch_size", "8"), "compiler.fast_loading", 1))
    assert "shapes.batch_size: must be an integer, got '8'" in errors
    assert "compiler.fast_loading: must be a boolean, got 1" in errors
    assert errors_of(with_(cpu_dict(), "shapes.batch_size", True)) == [
        "shapes.batch_size: must be an integer, got True"
    ]
    assert errors_of(with_(cpu_dict(), "shapes.token_buckets", [64, "128"]))[0].startswith(
        "shapes.token_buckets: must be a list of integers"
    )


def test_name_is_required():
    d = cpu_dict()
    del d["name"]
    assert errors_of(d) == ["name: is required"]


def test_special_and_local_sources_are_accepted():
    for source in ("tiny", "default", "/models/llama", "models/x.gguf", "s3://bucket/prefix/"):
        recipe_from_dict(with_(cpu_dict(), "model.source", source))


def test_neuron_requires_known_instance():
    d = with_(neuron_dict(), "target.instance", "")
    assert errors_of(d)[0].startswith("target.instance: is required for kind 'neuron'; known: inf2.xlarge")
    d = with_(neuron_dict(), "target.instance", "inf3.large")
    assert errors_of(d)[0].startswith("target.instance: unknown instance type 'inf3.large'")
    # cpu recipes may leave it empty
    assert recipe_errors(recipe_from_dict(with_(cpu_dict(), "target.instance", ""))) == []


def test_neuron_tp_degree_rules():
    d = with_(with_(neuron_dict(), "target.tp_degree", 3), "serve.workers", 1)
    assert errors_of(d) == ["target.tp_degree: must be one of 1, 2, 4, 8, 24 on inf2, got 3"]
    d = with_(with_(neuron_dict(), "target.instance", "inf2.xlarge"), "serve.workers", 1)
    assert errors_of(d) == ["target.tp_degree: 8 exceeds the 2 NeuronCores of inf2.xlarge"]
    d = with_(with_(neuron_dict(), "target.instance", "trn1.32xlarge"), "target.tp_degree", 4)
    assert errors_of(d) == ["target.tp_degree: must be one of 1, 2, 8, 16, 32 on trn1, got 4"]


def test_workers_must_fit_the_instance_cores():
    errors = errors_of(with_(neuron_dict(), "serve.workers", 4))
    assert errors == ["serve.workers: 4 workers x tp_degree 8 = 32 NeuronCores, but inf2.48xlarge has 24"]


@pytest.mark.parametrize(
    "heads,kv,tp,ok",
    [
        (32, 8, 8, True),  # one KV head per rank
        (32, 8, 4, True),  # two KV heads per rank
        (32, 4, 8, True),  # 4 KV heads replicated to 8 ranks
        (32, 32, 8, True),
        (9, 3, 2, False),  # SmolLM2 at TP 2: heads do not split
        (24, 3, 8, False),  # 8 is not a multiple of 3 KV heads
        (48, 12, 8, False),  # 12 KV heads on 8 ranks: neither divides the other
    ],
)
def test_heads_against_tp_degree(heads, kv, tp, ok):
    d = with_(with_(neuron_dict(), "target.tp_degree", tp), "serve.workers", 1)
    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv)
    if ok:
        recipe_from_dict(d, model_config=config)
        return
    errors = errors_of(d, model_config=config)
    assert errors and all(e.startswith("target.tp_degree: the model's") for e in errors)
    if heads % tp == 0:
        assert f"{kv} KV heads must be divisible by {tp}" in errors[0] and "replicated" in errors[0]


def test_kernel_names_come_from_nki_kernels(monkeypatch):
    assert "decode_attention" in known_kernels()
    recipe_from_dict(with_(cpu_dict(), "kernels.enabled", ["rmsnorm_residual", "sampling"]))
    import nki_kernels

    monkeypatch.setattr(nki_kernels, "KERNELS", ("sampling", "new_kernel"), raising=False)
    recipe_from_dict(with_(cpu_dict(), "kernels.enabled", ["new_kernel"]))
    assert errors_of(with_(cpu_dict(), "kernels.enabled", ["qkv_rope"])) == [
        "kernels.enabled: unknown kernel 'qkv_rope'; known: sampling, new_kernel"
    ]


def test_on_neuron_the_decode_attention_kernel_needs_kv_buckets_in_its_blocks():
    d = with_(neuron_dict(), "kernels.enabled", ["decode_attention", "rmsnorm_residual"])
    recipe_from_dict(with_(d, "shapes.token_buckets", [512, 1024, 4096]))
    assert errors_of(with_(d, "shapes.token_buckets", [512, 1000, 4096])) == [
        "shapes.token_buckets: the NKI 'decode_attention' kernel reads the cache in blocks of 512 keys, so "
        "every KV bucket must be a multiple of 512; got [1000]"
    ]
    recipe_from_dict(with_(cpu_dict(), "kernels.enabled", ["decode_attention"]))  # KV buckets 64 and 128: fine on cpu


def test_invalid_toml_is_a_recipe_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(path)


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="neuron-serve")
    add_recipe_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_validate_ok_and_errors(tmp_path, capsys):
    assert _run_cli(["recipe", "validate", str(COMPILE_DIR / "tiny-cpu.toml")]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    bad = tmp_path / "bad.toml"
    bad.write_text(tomli_w.dumps(with_(with_(cpu_dict(), "shapes.batch_size", 0), "compiler.optlevel", 7)))
    assert _run_cli(["recipe", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "shapes.batch_size: must be >= 1, got 0" in err and "compiler.optlevel: must be one of 1, 2, 3" in err


def test_cli_validate_with_model_config(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text('{"num_attention_heads": 9, "num_key_value_heads": 3}')
    recipe = tmp_path / "tp2.toml"
    recipe.write_text(tomli_w.dumps(with_(cpu_dict(), "target.tp_degree", 2)))
    assert _run_cli(["recipe", "validate", str(recipe), "--model-config", str(config)]) == 1
    assert "9 attention heads are not divisible by 2" in capsys.readouterr().err
