"""The `neuron-serve` command line."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from neuron_serve import __version__
from neuron_serve.artifact.cli import add_artifacts_parser
from neuron_serve.bench.cli import add_bench_parser
from neuron_serve.bench.usage import add_usage_parser
from neuron_serve.recipe.cli import add_recipe_parser
from neuron_serve.recipe.schema import DTYPES, torch_dtype
from neuron_serve.tune.plan_cli import add_plan_parser
from neuron_serve.tune.profile_cli import add_profile_parser
from neuron_serve.tune.tune_cli import add_tune_parser


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from a prompt on the CPU, streaming to the terminal")
    p.add_argument("--model", default="default", help="'default', 'tiny', a HF directory, a .gguf file or s3://…")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from neuron_serve.artifact.graphs import GraphSet, power_of_two_buckets
    from neuron_serve.backends.cpu.runners import EagerRunner
    from neuron_serve.engine.generate import GenerationStats, generate
    from neuron_serve.engine.prompts import encode_prompt, stop_ids
    from neuron_serve.engine.sampler import SamplingParams
    from neuron_serve.weights.loader import build_model, load_model_files

    loaded = load_model_files(args.model, torch_dtype(args.dtype))
    model = build_model(loaded, args.max_seq_len)
    buckets = power_of_two_buckets(args.max_seq_len)
    runner = EagerRunner(model, GraphSet(1, args.max_seq_len, buckets, buckets))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    params.validate(loaded.config.vocab_size)
    prompt_ids = encode_prompt(loaded.tokenizer, args.prompt, args.chat)
    stats = GenerationStats()
    eos = stop_ids(loaded.tokenizer, loaded.config.eos_token_ids)
    for piece in generate(runner, loaded.tokenizer, prompt_ids, params, eos, stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print(
        f"\n[{stats.prompt_tokens} prompt tokens, {stats.output_tokens} generated; first token "
        f"{stats.first_token_s * 1000:.0f} ms; decode {stats.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )
    return 0


def _add_compile(subparsers) -> None:
    p = subparsers.add_parser("compile", help="compile a recipe into an artifact directory (cached)")
    p.add_argument("recipe", help="a recipe TOML, e.g. compile/smollm2-135m-cpu.toml")
    p.add_argument("--out", help="artifact directory (default: artifacts/<recipe name>)")
    p.add_argument("--upload", metavar="S3_PREFIX", help="then upload the artifact to S3_PREFIX/<artifact name>")
    p.add_argument(
        "--cache",
        metavar="S3_PREFIX",
        help="a compile cache shared by several hosts, behind the local one (default: "
        "$NEURON_SERVE_SHARED_CACHE, or $NEURON_SERVE_CACHE when it is an s3:// URL)",
    )
    p.set_defaults(func=_run_compile)


def _run_compile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from neuron_serve.artifact.remote import push_artifact
    from neuron_serve.compiler.compile import compile_recipe, quality_table, summary_table
    from neuron_serve.recipe.files import load_recipe
    from neuron_serve.weights.s3 import S3Url

    console = Console(stderr=True)
    if args.cache:
        S3Url.parse(args.cache)
        os.environ["NEURON_SERVE_SHARED_CACHE"] = args.cache  # read where the compile cache opens
    recipe = load_recipe(args.recipe)
    if args.upload:
        S3Url.parse(args.upload)  # a typo fails now, not after minutes of compiling
    result = compile_recipe(recipe, args.out, console)
    console.print(summary_table(result))
    if result.manifest.quality:
        console.print(quality_table(result.manifest.quality))
    print(push_artifact(result.out_dir, args.upload) if args.upload else result.out_dir)
    return 0


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="measure quantization methods' quality against the unquantized model (perplexity, agreement)"
    )
    p.add_argument("target", help="a recipe TOML or an artifact directory: its model, dtype and quantization")
    p.add_argument("--methods", help="comma-separated methods (default: the recipe's, or every one its target runs)")
    p.add_argument("--skip", help="comma-separated layers kept unquantized (default: the recipe's [quantization] skip)")
    p.add_argument("--prompts", type=int, default=32, help="prompts for the greedy agreement")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--window", type=int, default=256, help="tokens per perplexity window")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from rich.console import Console

    from neuron_serve.artifact.manifest import read_manifest
    from neuron_serve.compiler.compile import quality_table, resolve_precision
    from neuron_serve.compiler.quality import evaluate
    from neuron_serve.model.quantization import QuantSpec
    from neuron_serve.recipe.files import load_recipe
    from neuron_serve.recipe.schema import QUANTIZATION_METHODS
    from neuron_serve.recipe.validation import QUANTIZATION_SUPPORT
    from neuron_serve.weights.loader import load_model_files

    console = Console(stderr=True)
    target = Path(args.target)
    recipe = resolve_precision(read_manifest(target).recipe if target.is_dir() else load_recipe(target), console)
    section = recipe.quantization
    if args.methods:
        methods = args.methods.split(",")
    elif section.method != "none":
        methods = [section.method]
    else:
        refused = QUANTIZATION_SUPPORT.get(recipe.target.kind, {})
        methods = [m for m in QUANTIZATION_METHODS if m != "none" and m not in refused]
    unknown = [m for m in methods if m not in QUANTIZATION_METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(QUANTIZATION_METHODS)}")
    if args.skip is not None:
        section = dataclasses.replace(section, skip=[name for name in args.skip.split(",") if name])
    specs = [QuantSpec.of(dataclasses.replace(section, method=m)) for m in methods]
    loaded = load_model_files(recipe.model.source, recipe.model.torch_dtype)
    with console.status(f"evaluating {', '.join(methods)} on {recipe.model.source}"):
        rows = evaluate(loaded, specs, args.prompts, args.new_tokens, args.window)
    console.print(quality_table([row.to_dict() for row in rows]))
    return 0


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve artifacts, recipes (compiled first) or S3 artifacts over HTTP with gunicorn; several at once",
    )
    p.add_argument(
        "targets",
        nargs="*",
        help="artifact directories, recipe TOMLs or s3://BUCKET/PREFIX/NAME artifacts, each served under its "
        "recipe's name (none: $NEURON_SERVE_MODEL, else SageMaker's OPTION_MODEL_ID or /opt/ml/model)",
    )
    p.add_argument("--host", help="default: the recipe's [serve] host (127.0.0.1 unless it says otherwise)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("NEURON_SERVE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /ping and /health "
        "(default: $NEURON_SERVE_API_KEY, which keeps the key out of the process list)",
    )
    p.add_argument(
        "--tenants",
        type=Path,
        help="a tenants file (TOML): each tenant's key digest, models, rate limits and weight "
        "(neuron_serve/server/tenants.py); instead of --api-key",
    )
    p.add_argument("--usage-log", type=Path, help="append each request's usage record (JSON lines, no text) here")
    p.add_argument("--port", type=int, help="default: the recipe's [serve] port (8080)")
    p.add_argument("--workers", type=int, help="gunicorn workers, each with one replica of every model")
    p.add_argument("--timeout", type=int, help="seconds a silent worker lives before it is restarted (default 120)")
    p.add_argument("--max-waiting", type=int, help="bound of the waiting queue; beyond it requests get 429")
    p.add_argument("--model-name", help="the model id clients use (default: the recipe name; one model only)")
    p.add_argument("--log-prompts", action="store_true", help="include prompt text in the request log")
    p.add_argument(
        "--profile-dir",
        default="profiles",
        help="traffic profiles (counts, never text) go to PROFILE_DIR/<model name>/, at shutdown and on "
        "POST /admin/traffic from this host (default: profiles)",
    )
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    # prometheus-client picks its multiprocess mode when first imported: set the directory before.
    metrics_dir = Path(tempfile.gettempdir()) / f"neuron-serve-metrics-{os.getpid()}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    from neuron_serve.server.command import serve

    return serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuron-serve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"neuron-serve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_compile(subparsers)
    _add_eval(subparsers)
    _add_serve(subparsers)
    add_recipe_parser(subparsers)
    add_artifacts_parser(subparsers)
    add_profile_parser(subparsers)
    add_tune_parser(subparsers)
    add_bench_parser(subparsers)
    add_usage_parser(subparsers)
    add_plan_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # OSError: files and S3 (weights/s3.S3Error), one line each
        print(f"neuron-serve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
