"""Artifact checksums read once per change: a record in the user's cache stands for an unchanged file,
and any change to the file (content, mtime, the file replaced) sends it to be read again."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from neuron_serve.artifact import checksums
from neuron_serve.artifact.manifest import ArtifactManifest, CorruptArtifactError, verify_files, write_manifest
from neuron_serve.model.config import ModelConfig
from neuron_serve.recipe.schema import Recipe

CONTENT = b"weights " * 4096


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NEURON_SERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """The files whose bytes were read for their digest."""
    read = []
    original = checksums.sha256_file
    monkeypatch.setattr(checksums, "sha256_file", lambda path: read.append(path) or original(path))
    return read


@pytest.fixture
def settled(monkeypatch):
    """Files written by the test count as settled at once (they would after `RACY_SECONDS`)."""
    monkeypatch.setattr(checksums, "RACY_SECONDS", 0)


def artifact(directory: Path) -> ArtifactManifest:
    """A directory of real files with a manifest of their sizes and digests."""
    (directory / "weights").mkdir(parents=True)
    (directory / "weights" / "rank0.safetensors").write_bytes(CONTENT)
    (directory / "tokenizer.json").write_text("{}")
    config = ModelConfig("LlamaForCausalLM", 16, 8, 16, 1, 2, 1, 4)
    manifest = ArtifactManifest(Recipe(name="checksums"), config, {}, {}, ["weights/rank0.safetensors"])
    write_manifest(directory, manifest)
    return manifest


def test_an_unchanged_file_is_read_once(cache, reads, settled, tmp_path):
    manifest = artifact(tmp_path / "a")
    files_before = sorted(p.name for p in (tmp_path / "a").rglob("*"))
    verify_files(tmp_path / "a", manifest)
    verify_files(tmp_path / "a", manifest)
    assert sorted(p.name for p in reads) == ["rank0.safetensors", "tokenizer.json"]
    assert len(list(checksums.records_dir().glob("*.json"))) == 2  # in the cache ...
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == files_before  # ... not beside the artifact


@pytest.mark.parametrize("mtime", ["new", "set back"])
def test_a_file_altered_after_its_record_was_written_is_caught(cache, settled, tmp_path, mtime):
    manifest = artifact(tmp_path / "a")
    verify_files(tmp_path / "a", manifest)  # recorded
    target = tmp_path / "a" / "weights" / "rank0.safetensors"
    before = target.stat()
    with target.open("r+b") as f:  # the same file and size, one byte changed
        f.seek(100)
        f.write(b"W")
    if mtime == "new":
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    else:  # as `touch -d`, `cp -p` or tar would; the ctime still moves
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size
    with pytest.raises(CorruptArtifactError, match=r"rank0\.safetensors: checksum mismatch"):
        verify_files(tmp_path / "a", manifest)


def test_a_file_replaced_by_another_of_the_same_size_and_mtime_is_caught(cache, settled, tmp_path):
    manifest = artifact(tmp_path / "a")
    verify_files(tmp_path / "a", manifest)
    target = tmp_path / "a" / "weights" / "rank0.safetensors"
    before = target.stat()
    replacement = tmp_path / "replacement"
    replacement.write_bytes(CONTENT.replace(b"weights", b"WEIGHTS", 1))
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    replacement.replace(target)
    with pytest.raises(CorruptArtifactError, match=r"rank0\.safetensors: checksum mismatch"):
        verify_files(tmp_path / "a", manifest)


def test_a_file_changed_just_now_is_read_again_next_time(cache, reads, tmp_path):
    """Within a timestamp's granularity a further change could keep the stat: no record yet."""
    fresh = tmp_path / "fresh"
    fresh.write_bytes(CONTENT)
    assert checksums.recorded_sha256(fresh) == hashlib.sha256(CONTENT).hexdigest()
    assert checksums.recorded_sha256(fresh) == hashlib.sha256(CONTENT).hexdigest()
    assert reads == [fresh.absolute()] * 2
    assert not checksums.records_dir().exists()


def test_without_a_writable_cache_every_check_reads_the_file(tmp_path, monkeypatch, reads, settled):
    (tmp_path / "not-a-directory").write_text("")
    monkeypatch.setenv("NEURON_SERVE_CACHE", str(tmp_path / "not-a-directory" / "cache"))
    manifest = artifact(tmp_path / "a")
    verify_files(tmp_path / "a", manifest)
    verify_files(tmp_path / "a", manifest)
    assert len(reads) == 4
