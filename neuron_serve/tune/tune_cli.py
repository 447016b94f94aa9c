"""``neuron-serve tune RECIPE``: the recipe with its buckets refitted to the captured traffic."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neuron_serve.recipe.files import emit_recipe, load_recipe


def add_tune_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tune", help="refit a recipe's buckets to the traffic profiles a server wrote")
    p.add_argument("recipe", type=Path, help="the recipe the deployment was compiled from")
    p.add_argument("--profiles", type=Path, help="traffic-*.json files, found recursively (default: profiles/<name>)")
    p.add_argument("--out", type=Path, help="write the tuned recipe here (default: stdout)")
    p.set_defaults(func=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    from neuron_serve.tune.tune import read_profiles, traffic_summary, tune  # lazily: the CLI starts without torch

    recipe = load_recipe(args.recipe)
    profile = read_profiles(args.profiles or Path("profiles") / recipe.name)
    tuned, changes, warnings = tune(recipe, profile)
    # The report goes to stderr, so that stdout stays a clean TOML document when no --out is given.
    print(f"Tuning {args.recipe} on the traffic of {profile.deployment} (to {profile.written_at}):", file=sys.stderr)
    print(f"  {traffic_summary(profile)}", file=sys.stderr)
    for change in changes:
        verdict = f"{list(change.before)} -> {list(change.after)}" if change.changed else "kept"
        print(f"  shapes.{change.field}: {verdict}: {change.reason}", file=sys.stderr)
    for warning in warnings:
        print(f"  warning: {warning}", file=sys.stderr)
    emit_recipe(tuned, f"Tuned from {args.recipe} by `neuron-serve tune` on {profile.written_at}.", args.out)
    return 0
