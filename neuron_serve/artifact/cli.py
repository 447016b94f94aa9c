"""``neuron-serve artifacts ls|pull|push``: compiled artifacts on S3, by hand. The transfer code (and
torch, through the manifest) is imported on use, so the command line starts fast."""

from __future__ import annotations

import argparse
from pathlib import Path

from neuron_serve.weights.local_cache import cache_dir
from neuron_serve.weights.s3 import S3Url


def add_artifacts_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    artifacts = subparsers.add_parser("artifacts", help="list, pull and push compiled artifacts on S3")
    commands = artifacts.add_subparsers(dest="artifacts_command", required=True, metavar="{ls,pull,push}")

    ls = commands.add_parser("ls", help="the artifacts under an S3 prefix: name, model, target, size")
    ls.add_argument("prefix", help="s3://BUCKET/PREFIX/")
    ls.set_defaults(func=run_ls)

    pull = commands.add_parser(
        "pull", help="download an artifact into the local cache (verified; resumes), print its directory"
    )
    pull.add_argument("url", help="s3://BUCKET/PREFIX/NAME")
    pull.set_defaults(func=run_pull)

    push = commands.add_parser("push", help="upload an artifact directory to s3://BUCKET/PREFIX/NAME (manifest last)")
    push.add_argument("directory", type=Path)
    push.add_argument("prefix", help="s3://BUCKET/PREFIX/: the artifact goes to PREFIX/<directory name>")
    push.set_defaults(func=run_push)
    return artifacts


def run_ls(args: argparse.Namespace) -> int:
    """One line per artifact, whole (no table that a narrow terminal would cut), as `aws s3 ls` prints."""
    from neuron_serve.artifact.remote import list_artifacts

    found = list_artifacts(S3Url.parse(args.prefix))
    if not found:
        print(f"no artifacts under {args.prefix}")
    for artifact in found:
        recipe = artifact.manifest.recipe
        fields = (
            artifact.url,
            recipe.model.source,
            f"{recipe.target.kind} TP {recipe.target.tp_degree}",
            recipe.model.dtype,
            recipe.quantization.method,
            f"{artifact.size_bytes / 1e6:.1f} MB",
        )
        print("  ".join(map(str, fields)))
    return 0


def run_pull(args: argparse.Namespace) -> int:
    from neuron_serve.artifact.remote import pull_artifact

    print(pull_artifact(S3Url.parse(args.url), cache_dir()))
    return 0


def run_push(args: argparse.Namespace) -> int:
    from neuron_serve.artifact.remote import push_artifact

    print(push_artifact(args.directory, args.prefix))
    return 0
