"""S3 through boto3: URLs, transfers with boto3's transfer manager, and errors that name the object and
the cause.

boto3 finds the endpoint, region and credentials the usual way (AWS_ENDPOINT_URL_S3, AWS_PROFILE, an
instance role, ...), so the same code talks to S3 and to any S3 API server on loopback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Files transfer in parallel, and a big one in 16 MiB parts: the AWS CLI's concurrency, parts twice its
# 8 MiB because the weight files are hundreds of MB.
MAX_CONCURRENCY = 10
PART_BYTES = 16 * 2**20

_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
_NO_KEY = {"NoSuchKey", "404", "NotFound"}


class S3Error(OSError):
    """An S3 request failed; the message names the object and the cause, in one line."""


class S3NotFound(S3Error):
    """No such key or bucket."""


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str  # a key, or a prefix without its trailing slash ("" for the whole bucket)

    @classmethod
    def parse(cls, url: str) -> S3Url:
        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise ValueError(f"{url!r} is not an S3 URL (expected s3://BUCKET/PREFIX)")
        bucket, _, key = url[5:].partition("/")
        return cls(bucket, key.strip("/"))

    def child(self, relative: str) -> S3Url:
        return S3Url(self.bucket, f"{self.key}/{relative}" if self.key else relative)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def local_path(root: Path, relative: str, source: S3Url) -> Path:
    """`root / relative` for a name read from S3 (a key, a manifest's file list), refused when it would
    land outside `root`: an absolute name, or one with a `..` part."""
    name = PurePosixPath(relative)
    if not relative or name.is_absolute() or ".." in name.parts:
        raise S3Error(f"{source}: the file name {relative!r} would land outside {root}; refused")
    return root / name


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def client():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(max_pool_connections=MAX_CONCURRENCY * 2, retries={"mode": "standard"}))


@contextlib.contextmanager
def s3_errors(url: S3Url) -> Iterator[None]:
    """Turn boto3's exceptions into one-line `S3Error`s naming `url`."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise S3Error(
            f"{url}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, "
            "or run with an instance or execution role)"
        ) from None
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        detail = error.response.get("Error", {}).get("Message", "") or code
        if code == "NoSuchBucket":
            raise S3NotFound(f"{url}: no such bucket {url.bucket!r}") from None
        if code in _NO_KEY:
            raise S3NotFound(f"{url}: no such key") from None
        if code in _DENIED:
            raise S3Error(f"{url}: access denied ({detail})") from None
        raise S3Error(f"{url}: {code}: {detail}") from None
    except EndpointConnectionError as error:
        raise S3Error(f"{url}: cannot reach S3 ({error})") from None
    except BotoCoreError as error:
        raise S3Error(f"{url}: {error}") from None


@dataclass(frozen=True)
class S3Object:
    url: S3Url
    size: int

    def relative_to(self, prefix: S3Url) -> str:
        return self.url.key[len(prefix.key) :].lstrip("/")


def list_objects(prefix: S3Url) -> list[S3Object]:
    """Every object below `prefix` (as a folder: s3://b/p lists s3://b/p/..., not s3://b/p2)."""
    s3 = client()
    found = []
    with s3_errors(prefix):
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=prefix.bucket, Prefix=prefix.key + "/" if prefix.key else ""
        )
        for page in pages:
            found += [S3Object(S3Url(prefix.bucket, o["Key"]), o["Size"]) for o in page.get("Contents", [])]
    return found


def read_object(url: S3Url) -> bytes:
    with s3_errors(url):
        return client().get_object(Bucket=url.bucket, Key=url.key)["Body"].read()


def write_object(url: S3Url, body: bytes) -> None:
    with s3_errors(url):
        client().put_object(Bucket=url.bucket, Key=url.key, Body=body)


class _Progress:
    """An s3transfer subscriber that reports each chunk's bytes (s3transfer calls only the `on_*`
    methods a subscriber has)."""

    def __init__(self, on_bytes: Callable[[int], None]):
        self.on_bytes = on_bytes

    def on_progress(self, bytes_transferred: int, **kwargs) -> None:
        self.on_bytes(bytes_transferred)


def _transfer(jobs: list[tuple[S3Url, Path]], upload: bool, on_bytes: Callable[[int], None]) -> None:
    """Run every transfer at once through one transfer manager (files in parallel, big ones in parts)."""
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    config = TransferConfig(
        multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=MAX_CONCURRENCY
    )
    subscribers = [_Progress(on_bytes)]
    with create_transfer_manager(client(), config) as manager:
        futures = []
        for url, path in jobs:
            if upload:
                future = manager.upload(str(path), url.bucket, url.key, subscribers=subscribers)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                future = manager.download(url.bucket, url.key, str(path), subscribers=subscribers)
            futures.append((url, future))
        for url, future in futures:
            with s3_errors(url):
                future.result()


def download_files(jobs: list[tuple[S3Url, Path]], on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Download each (object, file); a file appears under its name only once complete (s3transfer
    writes a temporary name, then renames)."""
    _transfer(jobs, upload=False, on_bytes=on_bytes)


def upload_files(jobs: list[tuple[S3Url, Path]], on_bytes: Callable[[int], None] = lambda n: None) -> None:
    _transfer(jobs, upload=True, on_bytes=on_bytes)


def download_prefix(url: str, cache_root: Path) -> Path:
    """Copy every object under s3://bucket/prefix into the cache; objects already there with the
    same size are not fetched again. Returns the local directory (or its one GGUF file)."""
    prefix = S3Url.parse(url)
    target = cache_root / prefix.bucket / prefix.key
    objects = list_objects(prefix)
    if not objects:
        raise S3Error(f"{prefix}: no objects under this prefix")
    local = {o: local_path(target, o.relative_to(prefix), o.url) for o in objects}
    download_files([(o.url, p) for o, p in local.items() if not (p.exists() and p.stat().st_size == o.size)])
    ggufs = sorted(target.glob("*.gguf"))
    return ggufs[0] if ggufs and not (target / "config.json").exists() else target
