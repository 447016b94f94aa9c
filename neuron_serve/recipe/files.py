"""Recipes as TOML files and tables: strict loading, every error collected, and writing them back.

Loading is strict: an unknown key or section is an error (a typo must never fall back to a default
silently), and every error is collected and reported together, each naming its field and the rule.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from neuron_serve.recipe.schema import (
    CompilerSection,
    HeadCounts,
    KernelsSection,
    ModelSection,
    QuantizationSection,
    Recipe,
    RecipeError,
    ServeSection,
    ShapesSection,
    TargetSection,
)
from neuron_serve.recipe.validation import validate_recipe

_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "target": TargetSection,
    "shapes": ShapesSection,
    "kernels": KernelsSection,
    "quantization": QuantizationSection,
    "compiler": CompilerSection,
    "serve": ServeSection,
}
_TOP_SCALARS = {"name": str, "version": int}

_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    str: "a string",
    list[int]: "a list of integers",
    list[str]: "a list of strings",
}


def _type_ok(value: Any, hint: Any) -> bool:
    # bool is a subclass of int: `batch_size = true` must not pass as 1.
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, list) and all(_type_ok(v, hint.__args__[0]) for v in value)


def _section_from_dict(name: str, cls: type, data: Any, errors: list[str]) -> Any:
    if not isinstance(data, dict):
        errors.append(f"{name}: must be a table ([{name}]), got {data!r}")
        return None
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            errors.append(f"{name}.{key}: unknown key; allowed keys: {', '.join(hints)}")
        elif not _type_ok(value, hints[key]):
            errors.append(f"{name}.{key}: must be {_TYPE_NAMES[hints[key]]}, got {value!r}")
        else:
            # Copy lists so that the recipe never shares them with the caller's dict.
            kwargs[key] = list(value) if isinstance(value, list) else value
    return cls(**kwargs)


def recipe_structure(d: dict[str, Any]) -> Recipe:
    """A Recipe from a table whose keys and types are right; the rules are `validate_recipe`'s."""
    errors: list[str] = []
    allowed = [*_TOP_SCALARS, *_SECTIONS]
    errors += [f"{k}: unknown key or section; allowed: {', '.join(allowed)}" for k in d if k not in allowed]
    if "name" not in d:
        errors.append("name: is required")
    for key, typ in _TOP_SCALARS.items():
        if key in d and not _type_ok(d[key], typ):
            errors.append(f"{key}: must be {_TYPE_NAMES[typ]}, got {d[key]!r}")
    sections = {s: _section_from_dict(s, cls, d.get(s, {}), errors) for s, cls in _SECTIONS.items()}
    if errors:
        raise RecipeError(errors)
    return Recipe(name=d["name"], version=d.get("version", 1), **sections)


def recipe_from_dict(d: dict[str, Any], model_config: HeadCounts | None = None) -> Recipe:
    """Build and validate a Recipe from a parsed TOML table; RecipeError lists every problem.

    Semantic rules run only once the structure is right: on a mistyped recipe they would judge
    the defaults that stand in for the bad values.
    """
    recipe = recipe_structure(d)
    validate_recipe(recipe, model_config)
    return recipe


def load_recipe(path: str | Path, model_config: HeadCounts | None = None) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError([f"not valid TOML: {e}"], source=str(path)) from None
    try:
        return recipe_from_dict(data, model_config=model_config)
    except RecipeError as e:
        raise RecipeError(e.errors, source=str(path)) from None


def _one_line_arrays(text: str) -> str:
    # tomli_w puts every array element on its own line; bucket lists read (and diff) better on one.
    def join(match: re.Match) -> str:
        return "[" + ", ".join(item.strip().removesuffix(",") for item in match[1].splitlines()) + "]"

    return re.sub(r"\[\n((?: {4}.*,\n)+)\]", join, text)


def dumps_recipe(recipe: Recipe, comment: str = "") -> str:
    """The recipe as TOML; ``comment`` (may span lines) becomes a ``#`` header."""
    header = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
    return header + _one_line_arrays(tomli_w.dumps(recipe.to_dict()))


def save_recipe(recipe: Recipe, path: str | Path, comment: str = "") -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(dumps_recipe(recipe, comment))


def emit_recipe(recipe: Recipe, comment: str, out: Path | None) -> None:
    """Write a recipe to `out` (its directory made), saying so on stderr; or print it on stdout,
    where a command's report goes to stderr so that stdout stays one TOML document."""
    text = dumps_recipe(recipe, comment=comment)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text, end="")
