"""The artifact directory: manifest.json, weight shards, compiled graphs and the tokenizer.

Every file is listed in the manifest with its size and SHA-256; loading checks them first, so a
corrupt or truncated file is an error that names it, never garbage output (a file unchanged since
this machine last read it is checked against its recorded digest, `checksums.py`).
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import neuron_serve
from neuron_serve.artifact.checksums import recorded_sha256, sha256_file
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.kv_cache import KVCache
from neuron_serve.model.parallel import TensorParallel
from neuron_serve.recipe.files import recipe_structure
from neuron_serve.recipe.schema import Recipe, RecipeError

MANIFEST = "manifest.json"
# 2: a cpu graph's decode rows read their own cached positions, whatever KV bucket the step names
# (`GraphSet.exact_decode_shape`); a format-1 graph read the bucket, and the runner no longer passes it.
FORMAT_VERSION = 2


class CorruptArtifactError(ValueError):
    """An artifact file is missing, truncated or altered."""


@dataclass
class GraphRecord:
    name: str
    kind: str
    bucket: int
    file: str
    compile_seconds: float
    size_bytes: int
    cache_key: str
    cache_hit: bool


@dataclass
class ArtifactManifest:
    """Parsed once, typed: the recipe and the model config are objects, not the JSON's tables."""

    recipe: Recipe
    model_config: ModelConfig
    source: dict[str, str]
    toolchain: dict[str, str]
    weights: list[str]
    graphs: list[GraphRecord] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The quantization's cost (compiler/quality.py): one row for the unquantized model, one for the method.
    quality: list[dict[str, Any]] = field(default_factory=list)
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ArtifactManifest:
        data = json.loads(text)
        data["graphs"] = [GraphRecord(**g) for g in data["graphs"]]
        data["model_config"] = ModelConfig.from_dict(data["model_config"])
        # Validated when it was compiled: a rule added since must not turn an artifact unreadable.
        data["recipe"] = recipe_structure(data["recipe"])
        return cls(**data)


def toolchain_versions() -> dict[str, str]:
    return {
        "neuron_serve": neuron_serve.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def write_manifest(directory: Path, manifest: ArtifactManifest, known_sha256: dict[str, str] | None = None) -> None:
    """Checksum every file below `directory` (but the manifest) into the manifest and write it.
    `known_sha256` gives the digests of files already verified (by relative path), not read again."""
    known = known_sha256 or {}
    manifest.files = {}
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_file() and path.name != MANIFEST:
            manifest.files[name] = {"size": path.stat().st_size, "sha256": known.get(name) or sha256_file(path)}
    (directory / MANIFEST).write_text(manifest.to_json())


def read_manifest(directory: Path) -> ArtifactManifest:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not an artifact directory: {MANIFEST} is missing")
    try:
        manifest = ArtifactManifest.from_json(path.read_text())
    except (json.JSONDecodeError, TypeError, KeyError, RecipeError) as error:
        raise CorruptArtifactError(f"{path}: unreadable manifest ({error})") from None
    if manifest.format != FORMAT_VERSION:
        raise CorruptArtifactError(
            f"{path}: artifact format {manifest.format}, this neuron-serve reads format {FORMAT_VERSION}: "
            f"compile the recipe again (neuron-serve compile)"
        )
    return manifest


def verify_files(directory: Path, manifest: ArtifactManifest, names: list[str] | None = None) -> None:
    """Check size and SHA-256 of the listed files (all when `names` is None). A file unchanged since
    this machine last read it is not read again (`checksums.recorded_sha256`)."""
    for name in names if names is not None else list(manifest.files):
        expected = manifest.files.get(name)
        path = Path(directory) / name
        if expected is None:
            raise CorruptArtifactError(f"{path}: not listed in {MANIFEST}")
        if not path.exists():
            raise CorruptArtifactError(f"{path}: missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CorruptArtifactError(f"{path}: truncated or altered ({size} bytes, expected {expected['size']})")
        if recorded_sha256(path) != expected["sha256"]:
            raise CorruptArtifactError(f"{path}: checksum mismatch (the file is corrupt)")


def kv_cache_bytes(manifest: ArtifactManifest) -> int:
    """The KV cache of every rank together: batch_size x max_seq_len positions of every layer's KV heads."""
    recipe, config = manifest.recipe, manifest.model_config
    tp = recipe.target.tp_degree
    heads = TensorParallel(tp, 0).local_kv_heads(config.num_key_value_heads) * tp
    shapes = recipe.shapes
    return KVCache.nbytes(config, shapes.batch_size, shapes.max_seq_len, heads, recipe.model.torch_dtype)
