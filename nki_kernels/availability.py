"""Whether the NKI package (>= 0.5, the `nki` namespace) can be imported here, without importing it
into this process: importing nki_kernels must stay free of Neuron dependencies."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import re
from functools import cache
from pathlib import Path

# The kernels use NkiTensor.broadcast, new in NKI 0.5 (Neuron SDK 2.31).
MIN_NKI_VERSION = (0, 5)


def _version_tuple(text: str) -> tuple[int, ...]:
    """ "0.10.1rc2" -> (0, 10, 1): the leading digits of the first three parts."""
    parts = []
    for piece in text.split(".")[:3]:
        match = re.match(r"\d+", piece)
        parts.append(int(match.group()) if match else 0)
    return tuple(parts)


def _has_submodule(spec: importlib.machinery.ModuleSpec, name: str) -> bool:
    # Looks at the files; importlib.util.find_spec("nki.language") would import `nki` itself.
    for location in spec.submodule_search_locations or ():
        base = Path(location)
        if (base / name / "__init__.py").exists() or any(base.glob(f"{name}.*")):
            return True
    return False


@cache
def nki_unavailable_reason() -> str | None:
    """None when `import nki` would give NKI >= 0.5; otherwise why not, in one line."""
    spec = importlib.util.find_spec("nki")
    if spec is None:
        return "the `nki` package (Neuron SDK >= 2.31) is not installed"
    try:
        version = importlib.metadata.version("nki")
    except importlib.metadata.PackageNotFoundError:
        return "an `nki` module exists but no installed `nki` distribution provides it"
    if _version_tuple(version) < MIN_NKI_VERSION:
        return f"nki {version} is older than 0.5: the kernels use NkiTensor.broadcast, new in NKI 0.5 (Neuron SDK 2.31)"
    if not _has_submodule(spec, "language"):
        # PyPI's `nki` is an empty placeholder; the real one comes from AWS's package repository.
        return f"nki {version} has no nki.language (a placeholder package, not the Neuron SDK's)"
    return None


def nki_available() -> bool:
    return nki_unavailable_reason() is None
