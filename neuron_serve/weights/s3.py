"""Model sources and artifacts on S3, through boto3."""

from __future__ import annotations

from pathlib import Path


def _split(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.rstrip("/")


def download_prefix(url: str, cache_root: Path) -> Path:
    """Copy every object under s3://bucket/prefix into the cache; objects already there with the
    same size are not fetched again. Returns the local directory."""
    import boto3

    bucket, prefix = _split(url)
    target = cache_root / bucket / prefix
    client = boto3.client("s3")
    paginator = client.get_paginator("list_objects_v2")
    found = False
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix + "/" if prefix else ""):
        for obj in page.get("Contents", []):
            found = True
            relative = obj["Key"][len(prefix) :].lstrip("/")
            local = target / relative
            if local.exists() and local.stat().st_size == obj["Size"]:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(local))
    if not found:
        raise FileNotFoundError(f"no objects under {url}")
    ggufs = sorted(target.glob("*.gguf"))
    return ggufs[0] if ggufs and not (target / "config.json").exists() else target
