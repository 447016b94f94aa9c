"""``neuron-serve recipe ...``: import an LMI serving.properties, and validate a recipe."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

from neuron_serve.recipe.files import dumps_recipe, load_recipe
from neuron_serve.recipe.lmi import DEFAULT_INSTANCE, convert_lmi
from neuron_serve.recipe.schema import RecipeError
from neuron_serve.recipe.validation import recipe_errors


def add_recipe_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``recipe from-lmi`` and ``recipe validate``; each sets ``func(args) -> exit code``."""
    recipe = subparsers.add_parser("recipe", help="import and validate recipes (compile/NAME.toml)")
    commands = recipe.add_subparsers(dest="recipe_command", required=True, metavar="{from-lmi,validate}")

    lmi = commands.add_parser("from-lmi", help="convert a SageMaker LMI / DJL serving.properties to a recipe")
    lmi.add_argument("properties", type=Path, help="path to serving.properties")
    lmi.add_argument("--instance", default=DEFAULT_INSTANCE, help=f"target instance type (default {DEFAULT_INSTANCE})")
    lmi.add_argument("--name", help="recipe name (default: from option.model_id and the instance)")
    lmi.add_argument("--out", type=Path, help="write the recipe here (e.g. compile/NAME.toml) instead of stdout")
    lmi.set_defaults(func=run_from_lmi)

    validate = commands.add_parser("validate", help="check a recipe against every rule, report all errors")
    validate.add_argument("recipe", type=Path, help="path to compile/NAME.toml")
    validate.add_argument(
        "--model-config", type=Path, help="the model's config.json: also check heads against tp_degree"
    )
    validate.set_defaults(func=run_validate)
    return recipe


def run_from_lmi(args: argparse.Namespace) -> int:
    try:
        recipe, notes = convert_lmi(args.properties, instance=args.instance, name=args.name)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    errors = recipe_errors(recipe)
    # Notes go to stderr so that stdout stays a clean TOML document when no --out is given.
    print("Options not carried over or changed on the way:", file=sys.stderr)
    for note in notes:
        print(f"  - {note}", file=sys.stderr)
    if errors:
        print("error: the converted recipe is invalid:", file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        return 1
    text = dumps_recipe(recipe, comment=f"Imported from {args.properties} by `neuron-serve recipe from-lmi`.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    config = None
    try:
        if args.model_config:
            config = SimpleNamespace(**json.loads(args.model_config.read_text()))
            # Llama-1-style configs omit num_key_value_heads: one KV head per attention head.
            config.num_key_value_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
        load_recipe(args.recipe, model_config=config)
    except RecipeError as e:
        print(e, file=sys.stderr)
        return 1
    except (OSError, ValueError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"OK: {args.recipe}")
    return 0
