"""The local cache directory: the compile cache, S3 downloads and the tiny test model live below it.

NEURON_SERVE_CACHE names it; an s3:// value names a shared compile cache instead, and the local one then
stays in its default place (in front of the shared one).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT = Path.home() / ".cache" / "neuron-serve"


def cache_dir() -> Path:
    configured = os.environ.get("NEURON_SERVE_CACHE", "")
    return DEFAULT if not configured or configured.startswith("s3://") else Path(configured)


def shared_cache_url() -> str | None:
    """The shared compile cache (NEURON_SERVE_SHARED_CACHE, or an s3:// NEURON_SERVE_CACHE), if any."""
    configured = os.environ.get("NEURON_SERVE_SHARED_CACHE") or os.environ.get("NEURON_SERVE_CACHE", "")
    return configured if configured.startswith("s3://") else None
