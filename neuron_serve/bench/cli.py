"""``neuron-serve bench`` and ``neuron-serve bench compare``: argument parsing and the run from end to end."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

from neuron_serve.bench.client import ClientConfig, StreamingClient
from neuron_serve.bench.compare import compare_runs
from neuron_serve.bench.cost import CostModel, resolve_cost_model
from neuron_serve.bench.metrics import PERCENTILE_METRICS, SLO_METRICS, MetricsConfig
from neuron_serve.bench.report import build_run, console_summary, write_run
from neuron_serve.bench.runner import LoadLevel, run_sweep
from neuron_serve.bench.tokenizer import BenchError, BenchTokenizer, load_tokenizer
from neuron_serve.bench.workload import (
    PRESETS,
    BenchRequest,
    WorkloadSpec,
    corpus_token_ids,
    load_corpus,
    load_jsonl,
    synthetic_requests,
)

DEFAULT_CONCURRENCY = [1, 2, 4, 8, 16, 32, 64]


def _csv_of(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list: {text!r}") from exc
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive numbers: {text!r}")
        return values

    return parse


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number: {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= ratio < 1: {text!r}")
    return value


def _slo(text: str) -> tuple[str, float]:
    name, _, value = text.partition(":")
    try:
        ms = float(value)
    except ValueError:
        ms = -1.0
    if name not in SLO_METRICS or ms < 0:
        raise argparse.ArgumentTypeError(f"expected NAME:MILLISECONDS with NAME in {SLO_METRICS}: {text!r}")
    return name, ms


def _metric_names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(n not in PERCENTILE_METRICS for n in names):
        raise argparse.ArgumentTypeError(f"expected names from {PERCENTILE_METRICS}: {text!r}")
    return names


def _add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", help="server URL, e.g. http://127.0.0.1:8000 (the OpenAI routes under /v1)")
    g.add_argument("--model", help="model id to request (default: the first one at GET /v1/models)")
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    g.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos (outputs may then end before --output-len)",
    )
    g.add_argument("--timeout", type=_positive(float), default=600.0, help="longest silence within one stream (s)")


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="qa",
        help="input:output ratio qa 2:1 (256:128), summarization 8:1 (1024:128), generation 1:1 (256:256)",
    )
    g.add_argument("--input-len", type=_positive(int), help="mean prompt tokens (alone: output kept at the ratio)")
    g.add_argument("--output-len", type=_positive(int), help="mean output tokens (alone: input kept at the ratio)")
    g.add_argument(
        "--range-ratio", type=_fraction, default=0.0, help="spread: lengths uniform in [len*(1-r), len*(1+r)]"
    )
    g.add_argument("--dataset", type=Path, help='JSONL of {"prompt": ..., "output_len": N} instead of a preset')
    g.add_argument(
        "--tokenizer",
        help="Hugging Face tokenizer dir (e.g. ARTIFACTS/tokenizer); default: the server's /tokenize and /detokenize",
    )
    g.add_argument("--num-prompts", type=_positive(int), default=100, help="requests per load level")
    g.add_argument("--seed", type=int, default=0)


def _add_load_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load (closed loop by default)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--concurrency", type=_csv_of(int), help="closed loop: concurrency levels, default 1,2,4,8,16,32,64")
    x.add_argument("--request-rate", type=_csv_of(float), help="open loop: request rates (req/s), e.g. 1,2,4")
    g.add_argument(
        "--burstiness",
        type=_positive(float),
        default=1.0,
        help="open loop: gamma shape of arrival gaps (1 = Poisson, <1 burstier)",
    )
    g.add_argument("--max-concurrency", type=_positive(int), help="open loop: cap on requests in flight")


def _add_metric_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metrics")
    g.add_argument(
        "--metric-percentiles",
        type=_csv_of(float),
        default=[90.0, 99.0],
        help="percentiles to report besides mean and median (default 90,99)",
    )
    g.add_argument(
        "--percentile-metrics", type=_metric_names, default=list(PERCENTILE_METRICS), help="default ttft,tpot,itl,e2el"
    )
    g.add_argument(
        "--goodput",
        type=_slo,
        nargs="+",
        default=[],
        metavar="NAME:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50 (names ttft, tpot, e2el)",
    )


def _add_cost_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cost")
    g.add_argument("--instance", help="instance type for cost figures, e.g. inf2.xlarge, trn1.32xlarge")
    g.add_argument("--price-file", help='JSON {"inf2.xlarge": 0.99, ...} overriding catalog USD/hour')
    g.add_argument("--usd-per-hour", type=_positive(float), help="USD/hour of --instance (overrides everything)")
    g.add_argument("--replicas", type=_positive(int), default=1, help="model replicas the instance runs (default 1)")
    g.add_argument(
        "--measured-replicas", type=_positive(int), help="replicas behind the measured endpoint (default: --replicas)"
    )


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``bench`` (and its ``compare`` sub-command) to a parser's ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible endpoint (latency, throughput, cost)",
        description="Benchmark any OpenAI-compatible streaming endpoint (ours, vLLM, TGI, llama.cpp); "
        "'bench compare RUN_A RUN_B' compares two runs.",
    )
    for add in (_add_target_args, _add_workload_args, _add_load_args, _add_metric_args, _add_cost_args):
        add(p)
    p.add_argument("--output", type=Path, help="results directory of this run (created)")
    p.add_argument("--label", help="a name for this run, kept in the results")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run_bench)
    sub = p.add_subparsers(dest="bench_command", metavar="{compare}")
    c = sub.add_parser("compare", help="print two runs side by side")
    c.add_argument("run_a", type=Path, help="results directory (or results.json) of run A")
    c.add_argument("run_b", type=Path, help="results directory (or results.json) of run B")
    c.set_defaults(func=run_compare)
    return p


def run_compare(args: argparse.Namespace) -> int:
    try:
        print(compare_runs(args.run_a, args.run_b))
    except (OSError, ValueError, KeyError) as exc:
        print(f"neuron-serve bench compare: error: cannot read a run: {exc}", file=sys.stderr)
        return 2
    return 0


def run_bench(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BenchError as exc:
        print(f"neuron-serve bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuron-serve bench: interrupted before any load level ran; nothing written", file=sys.stderr)
        return 130


def split_base_url(url: str) -> tuple[str, str]:
    """The server's root (for /tokenize) and its OpenAI API base (…/v1), given either."""
    url = url.rstrip("/")
    root = url.removesuffix("/v1")
    return root, f"{root}/v1"


def first_model(api_base: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = requests.get(f"{api_base}/models", headers=headers, timeout=30)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
        raise BenchError(
            f"cannot list the models at {api_base}/models ({exc}); is the server up? Else pass --model"
        ) from exc


def _cost_model(args: argparse.Namespace) -> CostModel | None:
    if not args.instance:
        return None
    try:
        return resolve_cost_model(
            args.instance, args.price_file, args.usd_per_hour, args.replicas, args.measured_replicas
        )
    except (OSError, ValueError) as exc:
        raise BenchError(str(exc)) from exc


def _levels(args: argparse.Namespace) -> list[LoadLevel]:
    if args.request_rate:
        return [LoadLevel(args.max_concurrency, rate, args.burstiness) for rate in args.request_rate]
    if args.max_concurrency:
        raise BenchError("--max-concurrency caps an open loop (--request-rate); a closed loop uses --concurrency")
    return [LoadLevel(c) for c in args.concurrency or DEFAULT_CONCURRENCY]


def _tokenizer(args: argparse.Namespace, root: str, model: str, notes: list[str]) -> BenchTokenizer | None:
    """A tokenizer is required to cut synthetic prompts; with a dataset it only sharpens the counts."""
    if args.dataset is None or args.tokenizer:
        return load_tokenizer(args.tokenizer, root, model)
    try:
        return load_tokenizer(None, root, model)
    except BenchError:
        notes.append("no tokenizer: prompt lengths come from the server's usage numbers only")
        return None


def _prompt_overhead(tok: BenchTokenizer, endpoint: str, notes: list[str]) -> int:
    overhead = tok.prompt_overhead(endpoint)
    if overhead is None:
        notes.append(
            "the chat template's length is unknown without --tokenizer: prompts are longer than asked "
            "by that much (prompt_len in the results holds the server's real counts)"
        )
    return overhead or 0


def _synthetic_factory(
    spec: WorkloadSpec, tok: BenchTokenizer, endpoint: str, notes: list[str]
) -> Callable[[int], list[BenchRequest]]:
    print("tokenizing the prompt corpus ...", file=sys.stderr)
    corpus_ids = corpus_token_ids(tok, load_corpus())
    overhead = _prompt_overhead(tok, endpoint, notes)
    mean_in, mean_out = spec.lengths()
    longest = round((mean_in + mean_out) * (1 + spec.range_ratio))
    if tok.max_model_len and longest > tok.max_model_len:
        notes.append(f"up to {longest} tokens per request, above the server's max_model_len {tok.max_model_len}")
        print(f"warning: {notes[-1]}", file=sys.stderr)
    # Each level gets prompts of its own, so a prefix cache cannot make later levels look faster.
    return lambda level: synthetic_requests(spec, tok, corpus_ids, overhead, seed=[spec.seed, level])


def _describe_workload(spec: WorkloadSpec) -> str:
    if spec.dataset:
        return f"dataset {spec.dataset}"
    mean_in, mean_out = spec.lengths()
    spread = f" ±{spec.range_ratio:.0%}" if spec.range_ratio else ""
    return f"preset {spec.preset}: {mean_in} input → {mean_out} output tokens{spread}"


def _describe_load(levels: list[LoadLevel]) -> str:
    if levels[0].closed_loop:
        return "closed loop, concurrency " + ", ".join(str(lv.max_concurrency) for lv in levels)
    return "open loop, " + "; ".join(lv.label for lv in levels) + f" (burstiness {levels[0].burstiness:g})"


def _request_factory(
    spec: WorkloadSpec, tok: BenchTokenizer | None, endpoint: str, notes: list[str]
) -> tuple[Callable[[int], list[BenchRequest]], int]:
    """What each level sends (by level index), and how many requests that is."""
    if spec.dataset is None:
        assert tok is not None  # _tokenizer() raised otherwise
        return _synthetic_factory(spec, tok, endpoint, notes), spec.num_prompts
    overhead = _prompt_overhead(tok, endpoint, notes) if tok else 0
    dataset = load_jsonl(spec.dataset, spec.lengths()[1], spec.num_prompts, tok, overhead)
    return (lambda level: dataset), len(dataset)


def _run_config(args: argparse.Namespace, **facts: Any) -> dict[str, Any]:
    """The run-wide settings at the top of results.json; vLLM's names where vLLM has one."""
    backend = "openai-chat" if args.endpoint == "chat" else "openai"
    return {"date": facts.pop("date"), "endpoint_type": backend, "backend": backend, "label": args.label, **facts}


def _run(args: argparse.Namespace) -> int:
    if not args.base_url or not args.output:
        raise BenchError("--base-url and --output are required (or use: bench compare RUN_A RUN_B)")
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    root, api_base = split_base_url(args.base_url)
    cost = _cost_model(args)
    model = args.model or first_model(api_base, args.api_key)
    spec = WorkloadSpec(
        args.preset, args.input_len, args.output_len, args.range_ratio, args.num_prompts, args.seed, args.dataset
    )
    notes: list[str] = []
    tok = _tokenizer(args, root, model, notes)
    make_requests, num_prompts = _request_factory(spec, tok, args.endpoint, notes)
    levels = _levels(args)
    metrics_cfg = MetricsConfig(tuple(args.metric_percentiles), tuple(args.percentile_metrics), dict(args.goodput))
    client = StreamingClient(
        ClientConfig(api_base, model, args.endpoint, args.ignore_eos, 0.0, args.timeout, args.api_key)
    )
    print(f"benchmarking {model} at {client.cfg.url}: {_describe_load(levels)}", file=sys.stderr)
    runs, interrupted = run_sweep(client, levels, make_requests, tok, args.seed, args.progress)
    notes += [client.ignore_eos.note] if client.ignore_eos.note else []
    config = _run_config(
        args,
        date=date,
        model_id=model,
        tokenizer_id=tok.name if tok else None,
        num_prompts=num_prompts,
        base_url=api_base,
        workload=_describe_workload(spec),
        load=_describe_load(levels),
        ignore_eos=client.ignore_eos.state,
        percentiles=list(metrics_cfg.percentiles),
        percentile_metrics=list(metrics_cfg.percentile_metrics),
        goodput=metrics_cfg.goodput,
        instance=cost.describe() if cost else None,
        notes=notes,
        interrupted=interrupted,
    )
    run = build_run(config, runs, metrics_cfg, cost)
    paths = write_run(run, args.output)
    print(console_summary(run.levels))
    print(f"wrote {len(paths)} files to {args.output}" + (" (interrupted)" if interrupted else ""))
    if interrupted:
        return 130
    return 0 if any(lv["completed"] for lv in run.levels) else 1
