"""The package's structure holds: import layers, one place that decides the backend, modest modules."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "neuron_serve"


def test_import_layers_and_no_cycles():
    """The contracts in pyproject.toml: stage layers, independent backends, no import cycles."""
    lint_imports = shutil.which("lint-imports")
    assert lint_imports, "import-linter is part of the [dev] extra"
    result = subprocess.run([lint_imports], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def _kind_comparisons(tree: ast.AST) -> list[int]:
    """Lines that compare a `.kind` attribute with a string, e.g. `recipe.target.kind == "neuron"`."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Attribute) and o.attr == "kind" for o in operands) and any(
                isinstance(o, ast.Constant) and isinstance(o.value, str) for o in operands
            ):
                lines.append(node.lineno)
    return lines


def test_only_the_backends_look_at_the_target_kind():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "backends":
            continue
        lines = _kind_comparisons(ast.parse(path.read_text()))
        if lines:
            offenders[str(relative)] = lines
    assert not offenders, f"target kinds compared outside backends/: {offenders}"


def test_the_kind_check_sees_a_comparison():
    assert _kind_comparisons(ast.parse('if manifest.recipe.target.kind == "neuron":\n    pass')) == [1]


def test_no_module_is_past_four_hundred_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these modules by role: {long}"
