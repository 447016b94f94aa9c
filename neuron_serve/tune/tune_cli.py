"""``neuron-serve tune RECIPE``: the recipe changed to fit the captured traffic (and device profile)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neuron_serve.recipe.files import emit_recipe, load_recipe


def add_tune_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tune", help="change a recipe to fit the traffic (and device) profiles of its deployment")
    p.add_argument("recipe", type=Path, help="the recipe the deployment was compiled from")
    p.add_argument(
        "--profiles",
        type=Path,
        help="traffic-*.json and device-*.json files, found recursively (default: profiles/<name>)",
    )
    p.add_argument("--slo", default="", help="latency objectives in seconds, e.g. ttft=2,itl=0.2")
    p.add_argument("--model-config", type=Path, help="the model's config.json, for the heads a TP degree must divide")
    p.add_argument("--cores", type=int, help="cores to split (default: this host's CPUs, or the instance's)")
    p.add_argument("--out", type=Path, help="write the tuned recipe here (default: stdout)")
    p.set_defaults(func=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    # Lazily: the CLI starts without torch.
    from neuron_serve.tune.serving import Slo
    from neuron_serve.tune.tune import read_device_profile, read_profiles, recipe_model_config, traffic_summary, tune

    recipe = load_recipe(args.recipe)
    directory = args.profiles or Path("profiles") / recipe.name
    profile, device = read_profiles(directory), read_device_profile(directory)
    config = recipe_model_config(recipe, args.recipe.parent, args.model_config)
    result = tune(recipe, profile, Slo.parse(args.slo), device, config, args.cores)
    # The report goes to stderr, so that stdout stays a clean TOML document when no --out is given.
    print(f"Tuning {args.recipe} on the traffic of {profile.deployment} (to {profile.written_at}):", file=sys.stderr)
    print(f"  {traffic_summary(profile)}", file=sys.stderr)
    if device is None:
        print(f"  no device profile (device-*.json) under {directory}: kernels and flags kept", file=sys.stderr)
    for change in result.changes:
        verdict = f"{_value(change.before)} -> {_value(change.after)}" if change.changed else "kept"
        print(f"  {change.field}: {verdict}: {change.reason}", file=sys.stderr)
    for warning in result.warnings:
        print(f"  warning: {warning}", file=sys.stderr)
    for advice in result.advice:
        print(f"  device: {advice}", file=sys.stderr)
    emit_recipe(result.recipe, f"Tuned from {args.recipe} by `neuron-serve tune` on {profile.written_at}.", args.out)
    return 0


def _value(value: object) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)
