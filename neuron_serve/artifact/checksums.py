"""SHA-256 of artifact files, each read once per change rather than at every start of a replica.

`recorded_sha256` keeps a record per file in the user's cache directory (``<cache>/verified/``), never
beside the artifact: SageMaker's /opt/ml/model may be read-only, and the manifest checksums the
artifact directory's own file list. A record holds the digest and the file's stat when it was read:
size, mtime and ctime (ns), inode and device. A write changes mtime and ctime; ctime changes even when
mtime is set back (``touch -d``, ``cp -p``, tar) and a file put in its place has another inode. So a
record whose stat still matches describes the file as it is. Two cases stay uncached: a file changed
within `RACY_SECONDS` of being read (timestamps are coarse, a change in the same tick would keep its
stat: git's "racily clean" rule), and a record that cannot be written (the file is read every time).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from neuron_serve.weights.local_cache import cache_dir

RACY_SECONDS = 2  # above any filesystem's timestamp granularity (FAT's is 2 s; ext4's and xfs's a clock tick)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_sha256(path: Path) -> str:
    """`path`'s SHA-256: from its record when the file is unchanged since it was read, else read now
    (and recorded when it can be)."""
    path = path.absolute()
    record = records_dir() / f"{hashlib.sha256(str(path).encode()).hexdigest()}.json"
    before = _stat(path)
    try:
        recorded = json.loads(record.read_text())
        if recorded["path"] == str(path) and recorded["stat"] == before:
            return recorded["sha256"]
    except (OSError, ValueError, KeyError, TypeError):  # no record yet, or one cut short
        pass
    digest = sha256_file(path)
    settled = max(before[1], before[2]) < time.time_ns() - RACY_SECONDS * 10**9
    if settled and _stat(path) == before:  # and not changed while it was read
        _write(record, {"path": str(path), "stat": before, "sha256": digest})
    return digest


def records_dir() -> Path:
    return cache_dir() / "verified"


def _stat(path: Path) -> list[int]:
    s = path.stat()
    return [s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino, s.st_dev]


def _write(record: Path, content: dict) -> None:
    """Atomically (replicas starting together write the same records); not at all where the cache
    directory cannot be written."""
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=record.parent, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        os.replace(temporary, record)
    except OSError:
        Path(temporary).unlink(missing_ok=True)
