"""Artifacts and the compile cache on S3, against a real S3 API on loopback (moto's server mode) with
the real boto3 client and the real command line."""

from __future__ import annotations

import os
import subprocess
import sys

import boto3
import pytest
from conftest import tiny_recipe
from server_handle import ServerHandle

from neuron_serve.artifact.compile_cache import CompileCache, SharedCache
from neuron_serve.artifact.manifest import MANIFEST, CorruptArtifactError, read_manifest
from neuron_serve.artifact.remote import pull_artifact
from neuron_serve.cli import main
from neuron_serve.compiler.compile import compile_recipe
from neuron_serve.recipe.files import dumps_recipe
from neuron_serve.weights.s3 import S3Url


def push(artifacts, bucket: str, capsys) -> str:
    assert main(["artifacts", "push", str(artifacts), f"s3://{bucket}/team/"]) == 0
    return capsys.readouterr().out.strip()


def test_push_lists_and_pulls_every_file_verified(tiny_artifacts, s3_bucket, tmp_path, capsys):
    url = push(tiny_artifacts, s3_bucket, capsys)
    assert url == f"s3://{s3_bucket}/team/{tiny_artifacts.name}"
    assert main(["artifacts", "ls", f"s3://{s3_bucket}/team/"]) == 0
    assert url in capsys.readouterr().out
    local = pull_artifact(S3Url.parse(url), tmp_path)
    assert read_manifest(local).files == read_manifest(tiny_artifacts).files
    for name in read_manifest(local).files:
        assert (local / name).read_bytes() == (tiny_artifacts / name).read_bytes()


def test_the_manifest_goes_up_last(tiny_artifacts, s3_bucket, capsys, monkeypatch):
    """A reader that polls for the manifest never sees an artifact with files still missing."""
    uploads = []
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", boto3.session.Session())
    for operation in ("PutObject", "CreateMultipartUpload"):
        boto3.DEFAULT_SESSION.events.register(
            f"before-call.s3.{operation}", lambda params, **kwargs: uploads.append(params["url_path"])
        )
    url = S3Url.parse(push(tiny_artifacts, s3_bucket, capsys))
    files = {f"/{url.key}/{name}" for name in read_manifest(tiny_artifacts).files}  # the path, bucket aside
    assert set(uploads[:-1]) == files
    assert uploads[-1] == f"/{url.key}/{MANIFEST}"


def test_a_corrupt_object_is_refused_with_its_key_named(tiny_artifacts, s3_bucket, tmp_path, capsys):
    url = S3Url.parse(push(tiny_artifacts, s3_bucket, capsys))
    name = read_manifest(tiny_artifacts).weights[0]
    damaged = bytearray((tiny_artifacts / name).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size: only the checksum can tell
    boto3.client("s3").put_object(Bucket=url.bucket, Key=f"{url.key}/{name}", Body=bytes(damaged))
    with pytest.raises(CorruptArtifactError, match=f"s3://{url.bucket}/{url.key}/{name}: checksum mismatch"):
        pull_artifact(url, tmp_path)
    assert not (tmp_path / "artifacts" / url.bucket / url.key / MANIFEST).exists()  # nothing looks servable


def test_an_interrupted_pull_resumes_without_fetching_verified_files_again(tiny_artifacts, s3_bucket, tmp_path, capsys):
    url = S3Url.parse(push(tiny_artifacts, s3_bucket, capsys))
    local = pull_artifact(url, tmp_path)
    names = sorted(read_manifest(local).files)
    lost = read_manifest(local).weights[0]
    # An interruption: the manifest not yet written, one file not yet there, a transfer's temporary file left.
    (local / MANIFEST).unlink()
    (local / lost).unlink()
    (local / (lost + ".a1B2c3D4")).write_bytes(b"partial")
    kept = {name: (local / name).stat() for name in names if name != lost}
    assert pull_artifact(url, tmp_path) == local
    for name, before in kept.items():
        after = (local / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), f"{name} was fetched again"
    assert (local / lost).read_bytes() == (tiny_artifacts / lost).read_bytes()
    assert not (local / (lost + ".a1B2c3D4")).exists()
    assert (local / MANIFEST).exists()


def test_compile_uploads_and_serve_serves_from_s3(tiny_artifacts, s3_bucket, tmp_path, capsys):
    recipe_file = tmp_path / "tiny-cpu.toml"
    recipe_file.write_text(dumps_recipe(tiny_recipe()))
    out = tmp_path / "tiny-cpu"
    assert main(["compile", str(recipe_file), "--out", str(out), "--upload", f"s3://{s3_bucket}/fleet"]) == 0
    url = capsys.readouterr().out.strip().splitlines()[-1]
    assert url == f"s3://{s3_bucket}/fleet/tiny-cpu"
    server = ServerHandle(tiny_artifacts, targets=[url])
    try:
        reply = server_completion(server)
        assert reply["model"] == "tiny-cpu" and reply["usage"]["completion_tokens"] == 4
    finally:
        server.stop()


def server_completion(server: ServerHandle, model: str | None = None) -> dict:
    import requests

    body = {"model": model or server.model, "prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    response = requests.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_missing_credentials_give_one_line_not_a_traceback(s3_bucket, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL_S3"}
    nowhere = str(tmp_path / "none")
    env |= {"AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_CONFIG_FILE": nowhere, "AWS_EC2_METADATA_DISABLED": "true"}
    done = subprocess.run(
        [sys.executable, "-m", "neuron_serve.cli", "artifacts", "pull", f"s3://{s3_bucket}/team/tiny-cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"neuron-serve: error: s3://{s3_bucket}/team/tiny-cpu/")
    assert "no AWS credentials found" in lines[0]


def test_a_missing_artifact_and_a_missing_bucket_are_named(s3_bucket, tmp_path):
    with pytest.raises(OSError, match=rf"s3://{s3_bucket}/nothing/here/{MANIFEST}: no such key: .* not an artifact"):
        pull_artifact(S3Url.parse(f"s3://{s3_bucket}/nothing/here"), tmp_path)
    with pytest.raises(OSError, match="no such bucket 'no-such-bucket-x'"):
        pull_artifact(S3Url.parse("s3://no-such-bucket-x/a"), tmp_path)


def test_the_shared_compile_cache_gives_a_second_machine_every_entry(tiny_artifacts, s3_bucket, tmp_path, monkeypatch):
    """Machine A (this session's cache, which compiled the tiny recipe) seeds the shared cache; machine B,
    with an empty local cache, then compiles nothing: every graph and the weights come from S3."""
    shared = f"s3://{s3_bucket}/compile-cache"
    monkeypatch.setenv("NEURON_SERVE_SHARED_CACHE", shared)
    first = compile_recipe(tiny_recipe(), tmp_path / "a" / "tiny-cpu")
    assert all(graph.cache_hit for graph in first.manifest.graphs)
    monkeypatch.setenv("NEURON_SERVE_CACHE", str(tmp_path / "machine-b"))
    second = compile_recipe(tiny_recipe(), tmp_path / "b" / "tiny-cpu")
    assert second.manifest.graphs and all(graph.cache_hit for graph in second.manifest.graphs)
    assert second.manifest.files == first.manifest.files  # the same bytes, file for file
    assert any((tmp_path / "machine-b" / "graphs").iterdir())  # and B's local cache now holds them


def test_a_corrupt_shared_entry_is_named(s3_bucket, tmp_path):
    shared = SharedCache(f"s3://{s3_bucket}/cache")
    machine_a = CompileCache(tmp_path / "a", shared)
    staging = machine_a.staging_dir("graphs")
    (staging / "graph.so").write_bytes(b"compiled graph")
    machine_a.store("graphs", "k1", staging, {"what": "test"})
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="cache/graphs/k1/graph.so", Body=b"tampered graph")
    with pytest.raises(CorruptArtifactError, match=rf"s3://{s3_bucket}/cache/graphs/k1/graph.so: checksum mismatch"):
        CompileCache(tmp_path / "b", shared).lookup("graphs", "k1")


def test_a_manifest_naming_a_file_outside_the_artifact_is_refused(tiny_artifacts, s3_bucket, tmp_path, capsys):
    """A hostile manifest on S3 cannot make a pull write anywhere but the artifact's own directory."""
    url = S3Url.parse(push(tiny_artifacts, s3_bucket, capsys))
    manifest = read_manifest(tiny_artifacts)
    manifest.files["../../escaped.txt"] = {"size": 1, "sha256": "0" * 64}
    boto3.client("s3").put_object(Bucket=url.bucket, Key=f"{url.key}/{MANIFEST}", Body=manifest.to_json().encode())
    with pytest.raises(OSError, match=r"the file name '../../escaped.txt' would land outside .*; refused"):
        pull_artifact(url, tmp_path / "cache")
    assert not list(tmp_path.rglob("escaped.txt"))


def test_access_denied_names_the_object_and_s3s_reason():
    """moto's server grants every signed request: S3's AccessDenied reply is built here, as botocore parses it."""
    from botocore.exceptions import ClientError

    from neuron_serve.weights.s3 import S3Error, s3_errors

    reply = {"Error": {"Code": "AccessDenied", "Message": "User is not authorized to perform: s3:GetObject"}}
    with pytest.raises(S3Error, match=r"^s3://b/k/manifest.json: access denied \(User is not authorized"):
        with s3_errors(S3Url.parse("s3://b/k/manifest.json")):
            raise ClientError(reply, "GetObject")
