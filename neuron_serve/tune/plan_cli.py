"""``neuron-serve plan``: the layouts of a model on each Inf2/Trn1 instance, as a table, and the cost-optimal
one written as a recipe."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from neuron_serve.model.config import ModelConfig
from neuron_serve.recipe.cli import config_reference, model_config_path
from neuron_serve.recipe.files import load_recipe, save_recipe
from neuron_serve.recipe.instances import INSTANCES, Instance, get_instance, load_price_overrides
from neuron_serve.recipe.memory import GIB, RUNTIME_RESERVE
from neuron_serve.recipe.schema import AUTO_DTYPE, DTYPES, QUANTIZATION_METHODS, ModelSection, Recipe
from neuron_serve.recipe.validation import QUANTIZATION_SUPPORT, validate_recipe
from neuron_serve.tune.plan import NEURON_CORE_V2, Layout, Plan, PlanRequest, Roofline, layout_recipe, plan

T = TypeVar("T")
NEURON_QUANTIZATION = tuple(m for m in QUANTIZATION_METHODS if m not in QUANTIZATION_SUPPORT["neuron"])


def _csv(cast: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    return lambda text: tuple(cast(item) for item in text.split(",") if item)


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="list the feasible TP x replicas x batch layouts of a model per Inf2/Trn1 instance"
    )
    p.add_argument("recipe", nargs="?", type=Path, help="a recipe TOML: its model config (as `recipe validate`)")
    p.add_argument("--model-config", type=Path, help="the model's config.json (default: the recipe's)")
    p.add_argument("--source", help="[model] source of a recipe written from --model-config (default: its folder)")
    p.add_argument("--dtype", choices=DTYPES, help="default: the recipe's, else bfloat16")
    p.add_argument("--quantization", choices=NEURON_QUANTIZATION, help="default: the recipe's, else none")
    p.add_argument("--context", type=int, help="max tokens per sequence (default: the recipe's max_seq_len, or 4096)")
    p.add_argument("--concurrency", type=int, default=32, help="sequences decoding at once per instance")
    p.add_argument("--prompt-tokens", type=int, default=0, help="the prompt of TTFT (default: context / 2)")
    p.add_argument("--instances", type=_csv(str), help="comma-separated instance types (default: the catalog)")
    p.add_argument("--tp-degrees", type=_csv(int), help="comma-separated TP degrees (default: per instance)")
    p.add_argument("--itl-slo-ms", type=float, default=200.0, help="the cost-optimal layout's ITL bound")
    p.add_argument("--price-file", type=Path, help='JSON {"inf2.xlarge": 0.99}: $/hour overrides, as in bench')
    roofline = "; measure with `python -m benchmarks.roofline`. Both add a cpu row"
    p.add_argument("--cpu-bandwidth-gbs", type=float, help=f"this host's memory read bandwidth{roofline}")
    p.add_argument("--cpu-gflops", type=float, help=f"this host's matmul GFLOP/s in the dtype{roofline}")
    p.add_argument("--write-recipe", type=Path, help="write the cost-optimal layout here as a recipe")
    p.set_defaults(func=run_plan)
    return p


def _inputs(args: argparse.Namespace) -> tuple[Recipe, Path]:
    """The base recipe (the one given, or a new one) and the model config.json that sizes it."""
    if args.recipe:
        recipe = load_recipe(args.recipe)
        config = args.model_config or model_config_path(recipe, args.recipe.parent)
        if config is None:
            raise ValueError(f"{args.recipe} names no model config: pass --model-config")
        return recipe, config
    if not args.model_config:
        raise ValueError("plan needs a recipe or --model-config")
    source = args.source or str(args.model_config.resolve().parent)
    return Recipe(name="plan", model=ModelSection(source=source, dtype=AUTO_DTYPE)), args.model_config


def read_model_config(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except KeyError as e:
        raise ValueError(f"{path}: {e} is missing: plan needs the model's whole config") from None


def _request(args: argparse.Namespace, base: Recipe) -> PlanRequest:
    # bf16 is the NeuronCores' native matmul dtype: what `compile` would pick for an auto recipe.
    dtype = args.dtype or (base.model.dtype if base.model.dtype != AUTO_DTYPE else "bfloat16")
    return PlanRequest(
        dtype=dtype,
        quantization=args.quantization or base.quantization.method,
        context=args.context or (base.shapes.max_seq_len if args.recipe else 4096),
        concurrency=args.concurrency,
        prompt_tokens=args.prompt_tokens,
        itl_slo_s=args.itl_slo_ms / 1000,
    )


def _instances(args: argparse.Namespace) -> list[Instance]:
    catalog = load_price_overrides(args.price_file) if args.price_file else INSTANCES
    names = args.instances or tuple(catalog)
    return [catalog[get_instance(name).name] for name in names]


def _host(args: argparse.Namespace) -> Roofline | None:
    if (args.cpu_bandwidth_gbs is None) != (args.cpu_gflops is None):
        raise ValueError("--cpu-bandwidth-gbs and --cpu-gflops go together")
    if args.cpu_bandwidth_gbs is None:
        return None
    return Roofline("cpu host", args.cpu_bandwidth_gbs * 1e9, args.cpu_gflops * 1e9)


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


_COLUMNS = ("TP", "replicas", "batch", "weights/core", "KV/core", "TTFT ms", "ITL ms", "tok/s", "$/1M tok")


def _marks(row: Layout, result: Plan) -> str:
    best = {"latency-optimal": result.latency_optimal, "cost-optimal": result.cost_optimal}
    marks = [name for name, layout in best.items() if layout is row]
    return "<- " + ", ".join(marks) if marks else ""


def _cells(row: Layout, result: Plan) -> list[str]:
    """The row's aligned cells, then a free-text one: its marks, or why it is infeasible."""
    head = [str(row.tp_degree), str(row.replicas), str(row.batch_size)]
    if not row.feasible:
        return [*head, "infeasible: " + "; ".join(row.reasons)]
    return [
        *head,
        f"{row.weight_bytes / GIB:.2f} GiB",
        f"{row.kv_cache_bytes / GIB:.2f} GiB",
        _number(row.ttft_s * 1000, 1),
        _number(row.itl_s * 1000, 1),
        _number(row.tokens_per_s, 0),
        _number(row.usd_per_1m_tokens, 3),
        _marks(row, result),
    ]


def _table(rows: list[Layout], result: Plan) -> list[str]:
    lines = [[*_COLUMNS, ""], *(_cells(row, result) for row in rows)]
    widths = [max(len(cells[i]) for cells in lines if i < len(cells) - 1) for i in range(len(_COLUMNS))]
    return [
        ("  " + "  ".join(c.rjust(w) for c, w in zip(cells[:-1], widths, strict=False)) + "  " + cells[-1]).rstrip()
        for cells in lines
    ]


def _describe(row: Layout, concurrency: int) -> str:
    replicas = f"{row.replicas} replica{'s' if row.replicas > 1 else ''}"
    text = (
        f"{row.instance}, TP {row.tp_degree} x {replicas} x batch {row.batch_size}: TTFT "
        f"{row.ttft_s * 1000:.1f} ms, ITL {row.itl_s * 1000:.1f} ms, {row.tokens_per_s:,.0f} output tokens/s, "
        f"${_number(row.usd_per_1m_tokens, 3)} per 1M output tokens"
    )
    if (count := row.instances_for(concurrency)) > 1:
        text += f"; {count} instances for {concurrency} concurrent sequences"
    return text


def _summary(result: Plan, config: ModelConfig) -> list[str]:
    r, m = result.request, result.model
    hw = NEURON_CORE_V2
    return [
        f"Model: {config.architecture}, {config.num_hidden_layers} layers, {config.num_attention_heads} attention "
        f"heads, {config.num_key_value_heads} KV heads x {config.head_dim} dims, vocab {config.vocab_size}; "
        f"{m.matmul_params / 1e9:.2f} B linear-layer weights",
        f"{r.dtype}, quantization {r.quantization}: weights {m.weight_bytes / 1e9:.2f} GB "
        f"({m.weight_bytes / GIB:.2f} GiB), KV cache {m.kv_bytes_per_token / 1024:g} KiB per token",
        f"Context {r.context} tokens, {r.concurrency} concurrent sequences per instance, TTFT of a {r.prompt}-token "
        f"prompt, ITL SLO {r.itl_slo_s * 1000:g} ms",
        f"Roofline per {hw.name}: {hw.bytes_per_s / 1e9:g} GB/s, {hw.flops_per_s / 1e12:g} TFLOPS at peak; HBM per "
        f"core less {RUNTIME_RESERVE / GIB:g} GiB runtime reserve. Estimates rank layouts; they are not measurements.",
    ]


def render(result: Plan, config: ModelConfig, instances: list[Instance]) -> str:
    lines = _summary(result, config)
    sections = [(i.name, f"{i.neuron_cores} NeuronCores, ${i.usd_per_hour}/hour") for i in instances]
    sections.append(("cpu", "this host's measured rates, no price; its memory is not checked"))
    for name, about in sections:
        rows = [row for row in result.layouts if row.instance == name]
        if rows:
            lines += ["", f"{name}: {about}", *_table(rows, result)]
    c = result.request.concurrency
    best = {"latency-optimal": result.latency_optimal, "cost-optimal": result.cost_optimal}
    lines.append("")
    for name, row in best.items():
        lines.append(f"{name}: " + (_describe(row, c) if row else "none: no feasible layout qualifies"))
    return "\n".join(lines)


def write_recipe(result: Plan, base: Recipe, config: ModelConfig, config_path: Path, out: Path) -> Recipe:
    """The cost-optimal layout as a recipe named after its file, validated against the model config."""
    row = result.cost_optimal
    if row is None:
        raise ValueError("--write-recipe: no feasible layout meets the ITL SLO")
    recipe = layout_recipe(base, row.instance, row.tp_degree, row.replicas, row.batch_size, result.request)
    # The config that sized the layout, named relative to the new recipe so that `recipe validate` finds it.
    model = dataclasses.replace(recipe.model, config=config_reference(config_path, out))
    recipe = dataclasses.replace(recipe, name=out.stem, model=model)
    validate_recipe(recipe, config)
    why = f"Written by `neuron-serve plan`: the cost-optimal layout.\n{_describe(row, result.request.concurrency)}"
    save_recipe(recipe, out, comment=why)
    return recipe


def run_plan(args: argparse.Namespace) -> int:
    base, config_path = _inputs(args)
    config = read_model_config(config_path)
    instances = _instances(args)
    result = plan(base, config, _request(args, base), instances, args.tp_degrees, _host(args))
    print(render(result, config, instances))
    if args.write_recipe:
        write_recipe(result, base, config, config_path, args.write_recipe)
        print(f"wrote {args.write_recipe}", file=sys.stderr)
    return 0
