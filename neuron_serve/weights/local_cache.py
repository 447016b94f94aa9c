"""The local cache directory: the compile cache, S3 downloads and the tiny test model live below it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("NEURON_SERVE_CACHE", Path.home() / ".cache" / "neuron-serve"))
