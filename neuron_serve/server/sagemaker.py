"""What a SageMaker container serves when `serve` is given no model: LMI's OPTION_MODEL_ID, else the
contents of /opt/ml/model.

SageMaker unpacks the model data into /opt/ml/model (SM_MODEL_DIR overrides the path, for tests and
other hosts). It may hold a compiled artifact (manifest.json), a recipe (*.toml), an LMI
serving.properties, or a raw model (config.json and weights, or a .gguf). LMI's environment options
(OPTION_TENSOR_PARALLEL_DEGREE=8 is serving.properties' option.tensor_parallel_degree=8) apply to a
serving.properties and win over it, as in LMI; with OPTION_MODEL_ID and no serving.properties they alone
configure the model.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from neuron_serve.artifact.manifest import MANIFEST
from neuron_serve.artifact.remote import remote_manifest
from neuron_serve.recipe.files import emit_recipe, load_recipe
from neuron_serve.recipe.lmi import DEFAULT_INSTANCE, convert_properties, ladder, parse_properties
from neuron_serve.recipe.schema import Recipe, TargetSection
from neuron_serve.weights.s3 import S3NotFound, S3Url, is_s3

MODEL_DIR = Path("/opt/ml/model")
NEURON_DEVICE = Path("/dev/neuron0")


def model_dir(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("SM_MODEL_DIR", MODEL_DIR))


def lmi_options(env: Mapping[str, str]) -> dict[str, str]:
    """OPTION_X=value as serving.properties' option.x=value (LMI's rule for its environment)."""
    return {"option." + k.removeprefix("OPTION_").lower(): v for k, v in env.items() if k.startswith("OPTION_")}


def sagemaker_target(env: Mapping[str, str] = os.environ) -> str:
    """The model to serve, as a `serve` target: an artifact directory or S3 URL, or a recipe file."""
    root = model_dir(env)
    options = lmi_options(env)
    model_id = options.get("option.model_id", "")
    if is_s3(model_id) and _is_artifact(S3Url.parse(model_id)):
        return model_id
    if not model_id and (root / MANIFEST).exists():
        return str(root)
    recipes = sorted(root.glob("*.toml")) if root.is_dir() else []
    if not model_id and recipes:
        return str(recipes[0])
    properties = root / "serving.properties"
    if not (model_id or properties.exists() or _holds_model(root)):
        raise FileNotFoundError(
            f"nothing to serve: give a model to `serve`, set OPTION_MODEL_ID or NEURON_SERVE_MODEL, or put "
            f"an artifact, a recipe, a serving.properties or a model in {root} (SM_MODEL_DIR)"
        )
    props = parse_properties(properties.read_text()) if properties.exists() else {}
    recipe = _recipe_from_lmi(props | options, root, env)
    return str(_write_recipe(recipe))


def _is_artifact(url: S3Url) -> bool:
    try:
        remote_manifest(url)
    except S3NotFound:
        return False
    return True


def _holds_model(root: Path) -> bool:
    return root.is_dir() and ((root / "config.json").exists() or any(root.glob("*.gguf")))


def _recipe_from_lmi(props: dict[str, str], root: Path, env: Mapping[str, str]) -> Recipe:
    """LMI's conversion, for this machine: on a host without NeuronCores, the same model on the CPU."""
    instance = env.get("NEURON_SERVE_INSTANCE", DEFAULT_INSTANCE)
    recipe, notes = convert_properties(props, root, instance, env.get("NEURON_SERVE_MODEL_NAME"))
    if not NEURON_DEVICE.exists():
        recipe = _on_cpu(recipe)
        notes.append(f"target: cpu, TP 1, one worker: this host has no NeuronCores ({NEURON_DEVICE} is absent)")
    print("LMI configuration: options not carried over, changed on the way, or defaulted:", file=sys.stderr)
    for note in notes:
        print(f"  - {note}", file=sys.stderr)
    return recipe


def _on_cpu(recipe: Recipe) -> Recipe:
    """The CPU's precision for this host, one replica, and KV buckets from the default CPU recipe's rule
    (powers of two from 128, or half the context): LMI's start at 512 is for NeuronCores."""
    model = dataclasses.replace(recipe.model, dtype="auto")
    n = recipe.shapes.max_seq_len
    shapes = dataclasses.replace(recipe.shapes, token_buckets=ladder(min(128, n // 2), n))
    serve = dataclasses.replace(recipe.serve, workers=1)
    name = recipe.name.removesuffix(f"-{recipe.target.instance}") + "-cpu"
    return dataclasses.replace(
        recipe, name=name, model=model, target=TargetSection(kind="cpu"), shapes=shapes, serve=serve
    )


def _write_recipe(recipe: Recipe) -> Path:
    path = Path(tempfile.gettempdir()) / "neuron-serve-sagemaker" / f"{recipe.name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    emit_recipe(recipe, "Converted from SageMaker's LMI configuration by `neuron-serve serve`.", path)
    load_recipe(path)  # every rule checked now, each error naming its field
    return path
