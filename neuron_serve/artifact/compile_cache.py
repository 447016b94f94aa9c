"""The compile cache: weight shards and compiled graphs, each keyed by exactly what determines it.

Weight shards depend on the source's bytes, the dtype and the TP degree. A graph depends on the
model's architecture (not its weight values: weights are loaded into graphs at run time), its bucket,
the shapes, kernels and compiler settings, and the toolchain. So changing a serving-time field is a
hit for everything, changing one bucket recompiles one graph, and new weights for the same
architecture reuse every graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from neuron_serve.artifact.checksums import sha256_file
from neuron_serve.artifact.manifest import CorruptArtifactError
from neuron_serve.weights.local_cache import cache_dir, shared_cache_url
from neuron_serve.weights.s3 import S3NotFound, S3Url, download_files, local_path, read_object, upload_files

ENTRY = "entry.json"


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


class CompileCache:
    """Entries in a local directory; with `shared` (an S3 prefix), a local miss is looked up there and
    every new entry is stored there too, so a fleet of compile hosts compiles each graph once."""

    def __init__(self, root: Path, shared: SharedCache | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shared = shared

    def source_digest(self, path: Path) -> str:
        """SHA-256 over a source file or directory, remembered by (path, size, mtime) so that a big
        checkpoint is hashed once."""
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        memo_file = self.root / "source-digests.json"
        memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
        stamp_key = cache_key({"files": stamp})
        if stamp_key not in memo:
            digest = hashlib.sha256()
            for f in files:
                digest.update(f.relative_to(path if path.is_dir() else f.parent).as_posix().encode())
                digest.update(sha256_file(f).encode())
            memo[stamp_key] = digest.hexdigest()
            _write_atomic(memo_file, json.dumps(memo))
        return memo[stamp_key]

    def entry(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def lookup(self, kind: str, key: str) -> Path | None:
        """A complete entry whose files still match the checksums taken when it was stored: the local
        one, else the shared cache's, brought here."""
        entry = self.entry(kind, key)
        meta_file = entry / ENTRY
        if not meta_file.exists():
            return self._fetch_shared(kind, key)
        meta = json.loads(meta_file.read_text())
        for name, digest in meta["sha256"].items():
            file = entry / name
            if not file.exists() or sha256_file(file) != digest:
                shutil.rmtree(entry)  # damaged: rebuilt by the caller
                return None
        if self.shared and not self.shared.has(kind, key):  # a host that compiled before seeds the fleet
            self.shared.put(kind, key, entry)
        return entry

    def store(self, kind: str, key: str, staging: Path, info: dict[str, Any]) -> Path:
        """Move a finished staging directory into the cache as one entry (atomic rename)."""
        checksums = {
            p.relative_to(staging).as_posix(): sha256_file(p) for p in sorted(staging.rglob("*")) if p.is_file()
        }
        (staging / ENTRY).write_text(json.dumps({"sha256": checksums, "info": info}, indent=2))
        entry = self.entry(kind, key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        if entry.exists():
            shutil.rmtree(entry)
        staging.rename(entry)
        if self.shared:
            self.shared.put(kind, key, entry)
        return entry

    def _fetch_shared(self, kind: str, key: str) -> Path | None:
        if not self.shared:
            return None
        staging = self.staging_dir(kind)
        if not self.shared.get(kind, key, staging):
            shutil.rmtree(staging)
            return None
        entry = self.entry(kind, key)
        shutil.rmtree(entry, ignore_errors=True)
        staging.rename(entry)
        return entry

    def checksums(self, entry: Path) -> dict[str, str]:
        """SHA-256 of each file of an entry, as verified by `lookup` or taken by `store`."""
        return json.loads((entry / ENTRY).read_text())["sha256"]

    def info(self, entry: Path) -> dict[str, Any]:
        return json.loads((entry / ENTRY).read_text())["info"]

    def staging_dir(self, kind: str) -> Path:
        staging = self.root / kind / f".staging-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        return staging


class SharedCache:
    """Cache entries under an S3 prefix, as s3://.../KIND/KEY/FILES with the entry's entry.json (its
    files' checksums) written last: an entry is visible only once complete."""

    def __init__(self, url: str):
        self.prefix = S3Url.parse(url)

    def has(self, kind: str, key: str) -> bool:
        try:
            read_object(self.prefix.child(f"{kind}/{key}/{ENTRY}"))
        except S3NotFound:
            return False
        return True

    def get(self, kind: str, key: str, staging: Path) -> bool:
        """Download entry KIND/KEY into `staging`, each file checked against its entry.json."""
        url = self.prefix.child(f"{kind}/{key}")
        try:
            meta = read_object(url.child(ENTRY))
        except S3NotFound:
            return False
        checksums = json.loads(meta)["sha256"]
        download_files([(url.child(name), local_path(staging, name, url.child(ENTRY))) for name in checksums])
        for name, digest in checksums.items():
            if sha256_file(staging / name) != digest:
                raise CorruptArtifactError(f"{url.child(name)}: checksum mismatch (the shared cache entry is corrupt)")
        (staging / ENTRY).write_bytes(meta)
        return True

    def put(self, kind: str, key: str, entry: Path) -> None:
        url = self.prefix.child(f"{kind}/{key}")
        names = [p.relative_to(entry).as_posix() for p in sorted(entry.rglob("*")) if p.is_file()]
        upload_files([(url.child(name), entry / name) for name in names if name != ENTRY])
        upload_files([(url.child(ENTRY), entry / ENTRY)])


def open_compile_cache() -> CompileCache:
    """The local compile cache, in front of the shared one that NEURON_SERVE_CACHE=s3://... names."""
    shared = shared_cache_url()
    return CompileCache(cache_dir(), SharedCache(shared) if shared else None)


def link_or_copy(source: Path, target: Path) -> None:
    """Hard links make a cache hit cost no copy; across file systems, copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(text)
    temporary.replace(path)
