"""Artifacts on S3: push a compiled artifact, pull one into the local cache, list those under a prefix.

An artifact on S3 is the artifact directory's files under s3://bucket/prefix/NAME/. The manifest goes up
last and comes down first: a reader that finds it finds every file it lists, and it carries each
file's size and SHA-256, so a pull verifies every byte and can resume by keeping what already verifies.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from neuron_serve.artifact.checksums import recorded_sha256
from neuron_serve.artifact.manifest import MANIFEST, ArtifactManifest, CorruptArtifactError, read_manifest
from neuron_serve.progress import Progress
from neuron_serve.weights.s3 import (
    S3NotFound,
    S3Url,
    download_files,
    list_objects,
    local_path,
    read_object,
    upload_files,
)


def artifact_url(prefix: str, name: str) -> S3Url:
    """Where `push` puts artifact NAME under an upload prefix (s3://bucket/prefix/ → .../prefix/NAME)."""
    return S3Url.parse(prefix).child(name)


def push_artifact(directory: Path, prefix: str) -> S3Url:
    """Upload the artifact's files, each checked against its manifest first, then the manifest."""
    manifest = read_manifest(directory)
    target = artifact_url(prefix, Path(directory).resolve().name)
    for name, expected in manifest.files.items():
        if recorded_sha256(Path(directory) / name) != expected["sha256"]:
            raise CorruptArtifactError(f"{Path(directory) / name}: checksum mismatch, not uploaded")
    total = sum(f["size"] for f in manifest.files.values())
    with Progress(f"push {target}", total, unit="bytes") as progress:
        upload_files([(target.child(name), Path(directory) / name) for name in manifest.files], progress.advance)
    upload_files([(target.child(MANIFEST), Path(directory) / MANIFEST)])
    return target


def remote_manifest(url: S3Url) -> ArtifactManifest:
    manifest_url = url.child(MANIFEST)
    try:
        text = read_object(manifest_url).decode()
    except S3NotFound as error:
        raise S3NotFound(f"{error}: {url} is not an artifact (no manifest there)") from None
    try:
        return ArtifactManifest.from_json(text)
    except (ValueError, TypeError, KeyError) as error:
        raise CorruptArtifactError(f"{manifest_url}: unreadable manifest ({error})") from None


def local_copy(url: S3Url, cache_root: Path) -> Path:
    return cache_root / "artifacts" / url.bucket / url.key


def pull_artifact(url: S3Url, cache_root: Path) -> Path:
    """The artifact at `url` as a local directory below `cache_root`. Files already there that match the
    manifest stay; the rest are downloaded and verified; the manifest is written last, so an interrupted
    pull leaves no directory that looks complete, and the next one fetches only what is missing."""
    manifest = remote_manifest(url)
    local = local_copy(url, cache_root)
    for name in manifest.files:
        local_path(local, name, url.child(MANIFEST))
    (local / MANIFEST).unlink(missing_ok=True)
    needed = [name for name, expected in manifest.files.items() if not _matches(local / name, expected)]
    total = sum(manifest.files[name]["size"] for name in needed)
    with Progress(f"pull {url}", total, unit="bytes") as progress:
        download_files([(url.child(name), local / name) for name in needed], progress.advance)
    for name in needed:
        if not _matches(local / name, manifest.files[name]):
            (local / name).unlink(missing_ok=True)
            raise CorruptArtifactError(f"{url.child(name)}: checksum mismatch (the object is corrupt; not served)")
    _remove_unlisted(local, set(manifest.files))
    (local / MANIFEST).write_text(manifest.to_json())
    return local


def _matches(path: Path, expected: dict) -> bool:
    """The file is there as the manifest lists it (read again only if it changed since last read)."""
    return path.is_file() and path.stat().st_size == expected["size"] and recorded_sha256(path) == expected["sha256"]


def _remove_unlisted(local: Path, listed: set[str]) -> None:
    """Leftovers of an interrupted transfer, or files of an older artifact at the same place."""
    for path in sorted(local.rglob("*"), reverse=True):
        name = path.relative_to(local).as_posix()
        if path.is_file() and name not in listed:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            shutil.rmtree(path)


@dataclass(frozen=True)
class RemoteArtifact:
    url: S3Url
    manifest: ArtifactManifest

    @property
    def size_bytes(self) -> int:
        return sum(f["size"] for f in self.manifest.files.values())


def list_artifacts(prefix: S3Url) -> list[RemoteArtifact]:
    """Every complete artifact (one with a manifest) below `prefix`."""
    keys = [o.url.key for o in list_objects(prefix) if o.url.key.endswith("/" + MANIFEST)]
    urls = [S3Url(prefix.bucket, key.removesuffix("/" + MANIFEST)) for key in keys]
    return [RemoteArtifact(url, remote_manifest(url)) for url in urls]
