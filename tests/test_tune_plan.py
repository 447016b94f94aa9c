"""`neuron-serve plan`: layouts of a model per instance, sized as `recipe validate` sizes them, with a roofline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuron_serve.cli import main
from neuron_serve.model.config import ModelConfig
from neuron_serve.recipe.files import load_recipe
from neuron_serve.recipe.instances import INSTANCES
from neuron_serve.recipe.memory import core_memory
from neuron_serve.recipe.schema import Recipe
from neuron_serve.tune.plan import NEURON_CORE_V2, Layout, Plan, PlanRequest, Roofline, layout_recipe, plan

COMPILE_DIR = Path(__file__).resolve().parent.parent / "compile"
LLAMA_RECIPE = COMPILE_DIR / "llama-3.1-8b-inf2.48xlarge.toml"
LLAMA_CONFIG = COMPILE_DIR / "llama-3.1-8b-instruct.config.json"
REQUEST = PlanRequest(dtype="bfloat16", context=4096, concurrency=32)


@pytest.fixture(scope="module")
def hf() -> dict:
    return json.loads(LLAMA_CONFIG.read_text())


@pytest.fixture(scope="module")
def config(hf) -> ModelConfig:
    return ModelConfig.from_hf(hf)


@pytest.fixture(scope="module")
def base() -> Recipe:
    return load_recipe(LLAMA_RECIPE)


@pytest.fixture(scope="module")
def inf2_plan(base, config) -> Plan:
    return plan(base, config, REQUEST, [INSTANCES["inf2.48xlarge"], INSTANCES["inf2.xlarge"]])


def row(result: Plan, instance: str, tp: int) -> Layout:
    (found,) = [r for r in result.layouts if r.instance == instance and r.tp_degree == tp]
    return found


def test_llama_3_8b_weights_and_kv_cache_per_token_match_the_hand_figures(inf2_plan, hf):
    h, inter, layers, vocab = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"], hf["vocab_size"]
    kv_dims = hf["num_key_value_heads"] * (h // hf["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv_dims + 3 * h * inter + 2 * h  # q and o, k and v, the MLP, two norms
    params = layers * per_layer + 2 * vocab * h + h  # embeddings, lm_head, final norm
    assert params == pytest.approx(8.03e9, rel=1e-3)
    assert inf2_plan.model.weight_bytes == params * 2  # bf16: about 16 GB
    assert inf2_plan.model.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2 == 128 * 1024
    assert inf2_plan.model.matmul_params == params - vocab * h - (2 * layers + 1) * h


@pytest.mark.parametrize("tp", [3, 5, 6, 12, 24])
def test_tp_degrees_that_do_not_divide_the_heads_are_infeasible(base, config, tp):
    (layout,) = plan(base, config, REQUEST, [INSTANCES["inf2.48xlarge"]], tp_degrees=(tp,)).layouts
    assert not layout.feasible
    assert any(f"32 attention heads are not divisible by {tp}" in reason for reason in layout.reasons)


def test_tp_degrees_the_instance_does_not_offer_are_infeasible(base, config):
    result = plan(base, config, REQUEST, [INSTANCES["trn1.32xlarge"], INSTANCES["inf2.xlarge"]], tp_degrees=(4,))
    assert "must be one of 1, 2, 8, 16, 32 on trn1" in row(result, "trn1.32xlarge", 4).reasons[0]
    assert "exceeds the 2 NeuronCores of inf2.xlarge" in row(result, "inf2.xlarge", 4).reasons[0]


def test_tp_1_bf16_llama_does_not_fit_a_neuroncore(inf2_plan):
    layout = row(inf2_plan, "inf2.xlarge", 1)
    assert (layout.replicas, layout.batch_size) == (2, 16)  # 32 sequences over 2 replicas
    assert not layout.feasible
    assert layout.reasons[0].startswith("does not fit: 14.96 GiB of weights")


def test_a_layout_is_sized_as_recipe_validate_sizes_its_recipe(inf2_plan, base, config):
    layout = row(inf2_plan, "inf2.48xlarge", 8)
    assert (layout.replicas, layout.batch_size) == (3, 11)  # ceil(32 / 3)
    recipe = layout_recipe(base, "inf2.48xlarge", 8, 3, 11, REQUEST)
    m = core_memory(recipe, config)
    assert (layout.weight_bytes, layout.kv_cache_bytes) == (m.weights, m.kv_cache)


def test_the_batch_shrinks_to_what_fits(inf2_plan, config):
    layout = row(inf2_plan, "inf2.xlarge", 2)
    assert layout.replicas == 1 and layout.batch_size < 32
    recipe = layout_recipe(load_recipe(LLAMA_RECIPE), "inf2.xlarge", 2, 1, layout.batch_size, REQUEST)
    assert core_memory(recipe, config).headroom >= 0
    bigger = layout_recipe(load_recipe(LLAMA_RECIPE), "inf2.xlarge", 2, 1, layout.batch_size + 1, REQUEST)
    assert core_memory(bigger, config).headroom < 0


def test_the_roofline_by_hand(inf2_plan, hf):
    layout = row(inf2_plan, "inf2.48xlarge", 8)
    core_bw, core_flops = 820e9 / 2, 190e12 / 2
    embedding = hf["vocab_size"] * hf["hidden_size"] * 2  # gathered, not streamed
    kv_read = 11 * 2048 * (128 * 1024 // 8)  # 11 sequences at half the context, one KV head of 8
    assert layout.itl_s == pytest.approx((layout.weight_bytes - embedding + kv_read) / core_bw)
    assert layout.ttft_s == pytest.approx(2 * inf2_plan.model.matmul_params / 8 * 2048 / core_flops)
    assert layout.tokens_per_s == pytest.approx(32 / layout.itl_s)
    usd = INSTANCES["inf2.48xlarge"].usd_per_hour
    assert layout.usd_per_1m_tokens == pytest.approx(usd / (layout.tokens_per_s * 3600) * 1e6)


def test_the_optima(inf2_plan):
    latency, cost = inf2_plan.latency_optimal, inf2_plan.cost_optimal
    assert (latency.instance, latency.tp_degree) == ("inf2.48xlarge", 8)
    assert latency.slots >= 32
    assert cost.itl_s <= REQUEST.itl_slo_s
    feasible = [r for r in inf2_plan.layouts if r.feasible]
    assert cost.usd_per_1m_tokens == min(r.usd_per_1m_tokens for r in feasible)
    assert latency.itl_s == min(r.itl_s for r in feasible if r.slots >= 32)


def test_a_tight_slo_moves_the_cost_optimal_layout(base, config):
    tight = PlanRequest(dtype="bfloat16", context=4096, concurrency=32, itl_slo_s=0.010)
    result = plan(base, config, tight, [INSTANCES["inf2.48xlarge"], INSTANCES["inf2.xlarge"]])
    assert (result.cost_optimal.instance, result.cost_optimal.tp_degree) == ("inf2.48xlarge", 8)
    none = PlanRequest(dtype="bfloat16", context=4096, concurrency=32, itl_slo_s=0.001)
    assert plan(base, config, none, [INSTANCES["inf2.xlarge"]]).cost_optimal is None


def test_the_cpu_row_uses_the_measured_rates(base, config):
    host = Roofline("cpu host", 50e9, 2e12)
    result = plan(base, config, REQUEST, [], host=host)
    (cpu,) = result.layouts
    assert (cpu.instance, cpu.batch_size, cpu.usd_per_1m_tokens) == ("cpu", 32, None)
    read = result.model.weight_bytes - 128256 * 4096 * 2 + 32 * 2048 * 128 * 1024
    assert cpu.itl_s == pytest.approx(read / 50e9)
    assert result.cost_optimal is None


def test_the_cli_prints_the_plan(capsys):
    assert main(["plan", str(LLAMA_RECIPE), "--instances", "inf2.48xlarge,inf2.xlarge", "--concurrency", "32"]) == 0
    out = capsys.readouterr().out
    assert "weights 16.06 GB (14.96 GiB), KV cache 128 KiB per token" in out
    assert f"{NEURON_CORE_V2.bytes_per_s / 1e9:g} GB/s" in out
    assert "inf2.48xlarge: 24 NeuronCores" in out and "inf2.xlarge: 2 NeuronCores" in out
    assert "infeasible: does not fit" in out
    assert "the model's 32 attention heads are not divisible by 24" in out
    assert "<- latency-optimal" in out and "cost-optimal: inf2.xlarge, TP 2" in out


def test_write_recipe_writes_the_cost_optimal_layout_as_a_valid_recipe(tmp_path, config, capsys):
    out = tmp_path / "recipes" / "llama-planned.toml"
    argv = ["plan", "--model-config", str(LLAMA_CONFIG), "--instances", "inf2.48xlarge", "--write-recipe", str(out)]
    assert main(argv) == 0
    recipe = load_recipe(out, model_config=config)  # validates heads and memory per core too
    assert recipe.name == "llama-planned"
    assert (recipe.target.instance, recipe.target.tp_degree, recipe.serve.workers) == ("inf2.48xlarge", 8, 3)
    assert (recipe.shapes.batch_size, recipe.shapes.max_seq_len, recipe.model.dtype) == (11, 4096, "bfloat16")
    assert (out.parent / recipe.model.config).resolve() == LLAMA_CONFIG
    assert main(["recipe", "validate", str(out)]) == 0


def test_plan_needs_a_model(capsys):
    assert main(["plan"]) == 2
    assert "plan needs a recipe or --model-config" in capsys.readouterr().err
