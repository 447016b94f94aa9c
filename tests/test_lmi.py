"""Importing a SageMaker LMI serving.properties: mapped options, and every other option listed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from neuron_serve.model.config import ModelConfig
from neuron_serve.recipe.cli import add_recipe_parser
from neuron_serve.recipe.files import load_recipe
from neuron_serve.recipe.lmi import convert_lmi, ladder, parse_properties
from neuron_serve.recipe.lmi_defaults import lmi_parameter_count
from neuron_serve.recipe.validation import recipe_errors

SAMPLE = Path(__file__).resolve().parent / "data" / "serving.properties"
LLAMA_8B = Path(__file__).resolve().parent.parent / "compile" / "llama-3.1-8b-instruct.config.json"
# Llama 3.1 70B's sizes, as in djl-serving's wlm/src/test/resources/smart-default-model/70b/config.json.
LLAMA_70B = {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_hidden_layers": 80}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serving.properties"
    path.write_text(text)
    return path


def test_sample_maps_every_equivalent_option():
    recipe, _ = convert_lmi(SAMPLE)
    assert recipe.name == "llama-3.1-8b-instruct-inf2.48xlarge"
    assert recipe.model.source == "s3://my-bucket/llama-3.1-8b-instruct/"
    assert recipe.model.dtype == "bfloat16"
    assert (recipe.target.kind, recipe.target.instance, recipe.target.tp_degree) == (
        "neuron",
        "inf2.48xlarge",
        8,
    )
    assert recipe.shapes.batch_size == 16
    assert recipe.shapes.max_seq_len == 4096
    assert recipe.shapes.context_buckets == [256, 1024, 2048]  # sorted
    assert recipe.shapes.token_buckets == [512, 1024, 2048, 4096]
    assert recipe.compiler.optlevel == 3
    assert recipe.compiler.extra_flags == ["--enable-mixed-precision-accumulation"]
    assert recipe.serve.workers == 3  # 24 cores / TP 8
    assert recipe_errors(recipe) == []


def test_sample_lists_every_unsupported_option_with_a_reason():
    _, notes = convert_lmi(SAMPLE)
    text = "\n".join(notes)
    for option in (
        "engine=Python",
        "option.entryPoint=djl_python.transformers_neuronx",
        "option.model_loading_timeout=1600",
        "option.trust_remote_code=true",
        "option.group_query_attention=shard-over-heads",
        "option.output_formatter=json",
        "option.rolling_batch=auto",
        "option.context_length_estimate=1024,256,2048",
    ):
        assert option in text, option
    assert "continuous batching" in text
    assert "from --instance" in text
    # mapped options are not reported as dropped
    assert not any(
        n.startswith(("option.tensor_parallel_degree", "option.n_positions", "option.dtype=")) for n in notes
    )


def test_unknown_options_are_never_dropped_silently(tmp_path):
    path = write(
        tmp_path,
        "option.model_id=/models/x\noption.n_positions=1024\noption.some_future_flag=1\nmaxWorkers=2\n",
    )
    _, notes = convert_lmi(path)
    assert any(n.startswith("option.some_future_flag=1: not carried over") for n in notes)
    assert any(n.startswith("maxWorkers=2: not carried over") for n in notes)


def test_without_model_id_the_model_dir_is_the_source(tmp_path):
    recipe, notes = convert_lmi(write(tmp_path, "option.tensor_parallel_degree=2\n"))
    assert recipe.model.source == str(tmp_path.resolve())
    assert any(n.startswith("option.model_id not set") for n in notes)
    assert recipe.name == f"{tmp_path.name.lower()}-inf2.48xlarge"


def test_batch_size_options(tmp_path):
    recipe, notes = convert_lmi(write(tmp_path, "option.model_id=/m\noption.batch_size=4\n"))
    assert recipe.shapes.batch_size == 4 and any(n.startswith("option.batch_size=4: used as") for n in notes)
    text = "option.model_id=/m\noption.batch_size=4\noption.max_rolling_batch_size=12\n"
    recipe, notes = convert_lmi(write(tmp_path, text))
    assert recipe.shapes.batch_size == 12
    assert any(n.startswith("option.batch_size=4: not carried over") for n in notes)


def test_json_context_length_estimate(tmp_path):
    text = "option.model_id=/m\noption.n_positions=1024\noption.context_length_estimate=[128, 512]\n"
    recipe, _ = convert_lmi(write(tmp_path, text))
    assert recipe.shapes.context_buckets == [128, 512]


def test_hub_model_id_is_kept_but_flagged(tmp_path):
    recipe, notes = convert_lmi(write(tmp_path, "option.model_id=meta-llama/Meta-Llama-3.1-8B-Instruct\n"))
    assert recipe.model.source == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert any("hub" in n and "download it first" in n for n in notes)


def test_lmi_defaults_without_the_model_config_and_instance_argument(tmp_path):
    recipe, notes = convert_lmi(write(tmp_path, "option.model_id=/models/llama\n"), instance="inf2.xlarge", name="x")
    assert recipe.name == "x" and recipe.target.instance == "inf2.xlarge"
    # n_positions 4096 as LMI when max_position_embeddings is unknown, TP 'max', LMI's 32 slots
    assert (recipe.target.tp_degree, recipe.shapes.max_seq_len, recipe.shapes.batch_size) == (2, 4096, 32)
    assert recipe.model.dtype == "float16" and recipe.compiler.auto_cast_type == "fp16"
    assert recipe.shapes.context_buckets == [128, 256, 512, 1024, 2048, 4096]
    assert recipe.shapes.token_buckets == [512, 1024, 2048, 4096]
    assert recipe.serve.workers == 1
    assert "option.dtype not set: fp16, as LMI's Neuron engine defaults" in notes
    for option in ("n_positions", "tensor_parallel_degree", "max_rolling_batch_size"):
        (note,) = [n for n in notes if n.startswith(f"option.{option} not set: ")]
        assert "the model config is out of reach (no config.json at /models/llama;" in note, note
        assert "pass --model-config" in note
    assert not any(n.startswith("model config:") for n in notes)


def test_lmi_defaults_from_a_local_model_config(tmp_path):
    (tmp_path / "config.json").write_text(LLAMA_8B.read_text())
    recipe, notes = convert_lmi(write(tmp_path, f"option.model_id={tmp_path}\n"))
    # LMI's memory heuristic for the 8B model on 24 NeuronCores: 12 replicas of TP 2, 16 slots each
    assert (recipe.target.tp_degree, recipe.shapes.max_seq_len, recipe.shapes.batch_size) == (2, 4096, 16)
    assert recipe.serve.workers == 12 and recipe.model.dtype == "float16"
    assert f"model config: read from {tmp_path / 'config.json'}, for LMI's defaults that depend on the model" in notes
    assert any(
        n.startswith("option.n_positions not set: 4096 = min(max_position_embeddings 131072, 4096)") for n in notes
    )
    assert any(n.startswith("option.tensor_parallel_degree not set: 2, by LMI's memory heuristic") for n in notes)
    assert "option.max_rolling_batch_size not set: 16 slots, LMI's memory heuristic at tp_degree 2" in notes
    assert recipe_errors(recipe, ModelConfig.from_hf(json.loads(LLAMA_8B.read_text()))) == []  # it fits


@pytest.mark.parametrize(
    ("sizes", "options", "tp", "batch"),
    [
        # djl-serving's NeuronSmartDefaultUtilsTest: 8B and 70B on 32 NeuronCores
        ({}, "", 2, 16),
        (LLAMA_70B, "", 32, 32),
        ({}, "option.tensor_parallel_degree=8\n", 8, 32),  # the batch heuristic at a given TP
        ({}, "option.max_rolling_batch_size=32\n", 8, 32),  # the fewest cores that hold 32 slots (no TP 4 on trn1)
    ],
)
def test_lmi_memory_heuristic_matches_lmi(tmp_path, sizes, options, tp, batch):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(json.loads(LLAMA_8B.read_text()) | sizes))
    path = write(tmp_path, "option.model_id=s3://my-bucket/llama/\n" + options)
    recipe, _ = convert_lmi(path, instance="trn1.32xlarge", model_config=config)
    assert (recipe.target.tp_degree, recipe.shapes.batch_size) == (tp, batch)


def test_lmi_parameter_count_is_lmis():
    llama_70b = json.loads(LLAMA_8B.read_text()) | LLAMA_70B
    assert lmi_parameter_count(llama_70b) == 71895883776  # NeuronSmartDefaultUtilsTest's figure
    assert lmi_parameter_count(json.loads(LLAMA_8B.read_text())) == 8030261248


def test_tensor_parallel_max_and_fp16(tmp_path):
    path = write(
        tmp_path,
        "option.model_id=/m\noption.tensor_parallel_degree=max\noption.dtype=fp16\noption.n_positions=2048\n",
    )
    recipe, _ = convert_lmi(path, instance="trn1.32xlarge")
    assert recipe.target.tp_degree == 32 and recipe.serve.workers == 1
    assert recipe.model.dtype == "float16" and recipe.compiler.auto_cast_type == "fp16"
    assert recipe.shapes.context_buckets == [128, 256, 512, 1024, 2048]


@pytest.mark.parametrize(
    "text,message",
    [
        ("option.model_id=/m\noption.dtype=int8\n", "option.dtype must be one of fp32, fp16, bf16"),
        ("option.model_id=/m\noption.n_positions=lots\n", "option.n_positions must be an integer"),
        ("option.model_id=/m\noption.context_length_estimate=a,b\n", "integers separated by commas"),
        ("option.model_id /m\n", "cannot parse line"),
    ],
)
def test_bad_properties_raise_clear_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        convert_lmi(write(tmp_path, text))


def test_parse_properties_format():
    props = parse_properties("# c\n! c\n\nengine = Python\noption.model_id=s3://b/p\noption.x: y\n")
    assert props == {"engine": "Python", "option.model_id": "s3://b/p", "option.x": "y"}


def test_ladder():
    assert ladder(512, 4096) == [512, 1024, 2048, 4096]
    assert ladder(100, 3000) == [128, 256, 512, 1024, 2048, 3000]
    assert ladder(512, 300) == [300]


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="neuron-serve")
    add_recipe_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_from_lmi_prints_toml_and_notes(capsys):
    assert _cli(["recipe", "from-lmi", str(SAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert 'instance = "inf2.48xlarge"' in out and "tp_degree = 8" in out
    assert "option.trust_remote_code=true" in err


def test_cli_from_lmi_writes_a_valid_recipe(tmp_path, capsys):
    out = tmp_path / "compile" / "imported.toml"
    argv = [
        "recipe",
        "from-lmi",
        str(SAMPLE),
        "--instance",
        "inf2.24xlarge",
        "--name",
        "imported",
        "--out",
        str(out),
    ]
    assert _cli(argv) == 0
    recipe = load_recipe(out)
    assert recipe.name == "imported" and recipe.target.instance == "inf2.24xlarge" and recipe.serve.workers == 1
    assert capsys.readouterr().out == ""


def test_cli_from_lmi_refuses_an_invalid_result(tmp_path, capsys):
    path = write(tmp_path, "option.model_id=/m\noption.tensor_parallel_degree=3\n")
    assert _cli(["recipe", "from-lmi", str(path), "--out", str(tmp_path / "r.toml")]) == 1
    assert "target.tp_degree: must be one of 1, 2, 4, 8, 24 on inf2, got 3" in capsys.readouterr().err
    assert not (tmp_path / "r.toml").exists()


@pytest.mark.parametrize(
    ("options", "method", "note"),
    [
        ("option.quantize=static_int8\n", "int8-weight", "option.quantize=static_int8: quantization.method"),
        ("option.load_in_8bit=true\n", "int8-weight", "option.load_in_8bit=true: quantization.method"),
        ("option.neuron_quant=true\n", "int8-weight", "option.neuron_quant=true: quantization.method"),
        ("option.quantize=awq\n", "none", "option.quantize=awq: not carried over: LMI's Neuron engine takes only"),
    ],
)
def test_lmi_quantize_maps_to_a_method_or_says_why_not(tmp_path, options, method, note):
    recipe, notes = convert_lmi(write(tmp_path, "option.model_id=/m\noption.dtype=bf16\n" + options))
    assert recipe.quantization.method == method
    assert any(n.startswith(note) for n in notes), notes
    assert recipe_errors(recipe) == []


def test_cli_from_lmi_model_config_sizes_the_recipe_and_is_named_in_it(tmp_path, capsys):
    path = write(tmp_path, "option.model_id=s3://my-bucket/llama/\n")
    out = tmp_path / "compile" / "llama.toml"
    assert _cli(["recipe", "from-lmi", str(path), "--model-config", str(LLAMA_8B), "--out", str(out)]) == 0
    recipe = load_recipe(out)
    assert (recipe.target.tp_degree, recipe.shapes.batch_size) == (2, 16)
    assert (out.parent / recipe.model.config).resolve() == LLAMA_8B
    capsys.readouterr()
    assert _cli(["recipe", "validate", str(out)]) == 0
    assert capsys.readouterr().out.startswith("Memory per NeuronCore (one of 2 TP ranks):")


def test_cli_from_lmi_refuses_lmis_layout_when_it_does_not_fit(tmp_path, capsys):
    # LMI sizes int8 8B at 1 byte per parameter: TP 1 with 16 slots. Here the embeddings and lm_head
    # stay fp16, so one core would need more than its 16 GiB.
    path = write(tmp_path, "option.model_id=s3://my-bucket/llama/\noption.quantize=static_int8\n")
    assert _cli(["recipe", "from-lmi", str(path), "--model-config", str(LLAMA_8B)]) == 1
    err = capsys.readouterr().err
    assert "option.tensor_parallel_degree not set: 1, by LMI's memory heuristic" in err
    assert "target.tp_degree: at tp_degree 1 one NeuronCore of inf2.48xlarge needs" in err
    assert "more than its 16.00 GiB of HBM" in err
