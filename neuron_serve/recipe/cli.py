"""``neuron-serve recipe ...``: import an LMI serving.properties, and validate a recipe."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from neuron_serve.model.config import ModelConfig, UnsupportedModelError
from neuron_serve.recipe.files import emit_recipe, load_recipe
from neuron_serve.recipe.lmi import DEFAULT_INSTANCE, convert_lmi
from neuron_serve.recipe.memory import memory_report
from neuron_serve.recipe.schema import HeadCounts, Recipe, RecipeError
from neuron_serve.recipe.validation import TARGET_MODEL_RULES, recipe_errors


def add_recipe_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``recipe from-lmi`` and ``recipe validate``; each sets ``func(args) -> exit code``."""
    recipe = subparsers.add_parser("recipe", help="import and validate recipes (compile/NAME.toml)")
    commands = recipe.add_subparsers(dest="recipe_command", required=True, metavar="{from-lmi,validate}")

    lmi = commands.add_parser("from-lmi", help="convert a SageMaker LMI / DJL serving.properties to a recipe")
    lmi.add_argument("properties", type=Path, help="path to serving.properties")
    lmi.add_argument("--instance", default=DEFAULT_INSTANCE, help=f"target instance type (default {DEFAULT_INSTANCE})")
    lmi.add_argument("--name", help="recipe name (default: from option.model_id and the instance)")
    lmi.add_argument("--out", type=Path, help="write the recipe here (e.g. compile/NAME.toml) instead of stdout")
    lmi.add_argument(
        "--model-config",
        type=Path,
        help="the model's config.json when option.model_id is not a local directory (S3, hub): LMI's "
        "n_positions, tensor_parallel_degree and batch size defaults depend on it; the recipe names it",
    )
    lmi.set_defaults(func=run_from_lmi)

    validate = commands.add_parser("validate", help="check a recipe against every rule, report all errors")
    validate.add_argument("recipe", type=Path, help="path to compile/NAME.toml")
    validate.add_argument(
        "--model-config",
        type=Path,
        help="the model's config.json (default: the recipe's [model] config, or config.json in a local "
        "[model] source): also check heads against tp_degree, and memory per NeuronCore",
    )
    validate.set_defaults(func=run_validate)
    return recipe


def model_config_path(recipe: Recipe, recipe_dir: Path) -> Path | None:
    """The config.json a recipe names: its [model] config (relative to `recipe_dir`, the recipe file's
    directory), else the one in a local [model] source."""
    if recipe.model.config:
        return recipe_dir / recipe.model.config
    local = Path(recipe.model.source).expanduser() / "config.json"
    return local if local.is_file() else None


def _read_model_config(path: Path) -> tuple[HeadCounts, str]:
    """The config.json at `path`, and why it cannot size the model ("" when it can)."""
    hf = json.loads(path.read_text())
    try:
        return ModelConfig.from_hf(hf), ""
    except (KeyError, UnsupportedModelError) as e:
        if "num_attention_heads" not in hf:
            raise ValueError(f"{path}: num_attention_heads is missing") from None
        # The heads still check tp_degree. Llama-1-style configs omit num_key_value_heads: one per head.
        heads = SimpleNamespace(**{"num_key_value_heads": hf["num_attention_heads"], **hf})
        why = f"it lacks {e}" if isinstance(e, KeyError) else str(e)
        return heads, f"{path} does not describe a whole supported model: {why}"


def _memory_note(recipe: Recipe, config: HeadCounts | None, why: str) -> str | None:
    """What `recipe validate` says of memory per NeuronCore (nothing on cpu)."""
    if recipe.target.kind not in TARGET_MODEL_RULES:
        return None
    if isinstance(config, ModelConfig):
        return memory_report(recipe, config)
    why = why or "no model config; pass --model-config, set [model] config, or use a local [model] source"
    return f"Memory per NeuronCore: not checked: {why}"


def config_reference(config: Path, out: Path | None) -> str:
    """[model] config naming `config` in a recipe written to `out`: relative to the recipe's
    directory, or absolute when the recipe goes to stdout (its directory is unknown)."""
    if out is None:
        return str(config.resolve())
    return os.path.relpath(config.resolve(), out.parent.resolve())


def run_from_lmi(args: argparse.Namespace) -> int:
    try:
        recipe, notes = convert_lmi(args.properties, args.instance, args.name, model_config=args.model_config)
        config_path = args.model_config or model_config_path(recipe, Path.cwd())
        config = _read_model_config(config_path)[0] if config_path else None
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.model_config:
        # The recipe names the config that sized it, so that `recipe validate` finds it again.
        recipe.model.config = config_reference(args.model_config, args.out)
    errors = recipe_errors(recipe, config)
    # Notes go to stderr so that stdout stays a clean TOML document when no --out is given.
    print("Options not carried over, changed on the way, or defaulted:", file=sys.stderr)
    for note in notes:
        print(f"  - {note}", file=sys.stderr)
    if errors:
        print("error: the converted recipe is invalid:", file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        return 1
    emit_recipe(recipe, f"Imported from {args.properties} by `neuron-serve recipe from-lmi`.", args.out)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    config, why = None, ""
    try:
        if args.model_config:
            config, why = _read_model_config(args.model_config)
        recipe = load_recipe(args.recipe, model_config=config)
        # A config that the recipe names is found once the recipe is read; its rules run then.
        if config is None and (path := model_config_path(recipe, args.recipe.parent)):
            config, why = _read_model_config(path)
            if errors := recipe_errors(recipe, config):
                raise RecipeError(errors, source=str(args.recipe))
    except RecipeError as e:
        print(e, file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if note := _memory_note(recipe, config, why):
        print(note)
    print(f"OK: {args.recipe}")
    return 0
