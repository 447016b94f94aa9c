"""Cold start from S3: the artifact pushed to a real S3 API on loopback (moto's server mode), then, side
by side in the same run on the same files:

- `aws s3 cp --recursive` (the AWS CLI, boto3's own transfer code) into an empty directory;
- `neuron-serve artifacts pull` into an empty cache (parallel, multipart, every file verified);
- `neuron-serve serve s3://...` from an empty cache: process start to `/ping` 200 and the first token,
  with the server's own phases, beside the same server started on the local artifact.

    pip install awscli   # the baseline; without it the transfer baseline is skipped
    python -m benchmarks.cold_start_s3 [--artifacts artifacts/smollm2-135m-cpu] [--runs 3] [--json PATH]

The goal: the pull at >= 80 % of the AWS CLI's rate, and the serve figures within the local goals plus
the transfer time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.cold_start import free_port, measure_cold_start, median_run, serve_command, table
from neuron_serve.artifact.manifest import read_manifest
from tests.s3_server import S3Server

TRANSFER_GOAL = 0.8  # our pull's rate / the AWS CLI's


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def transfers(url: str, env: dict[str, str], work: Path, runs: int) -> dict[str, float]:
    """Median seconds of each way to copy the artifact down, each run into an empty place."""
    seconds: dict[str, list[float]] = {"neuron-serve artifacts pull": []}
    aws = shutil.which("aws")
    if aws:
        seconds["aws s3 cp --recursive"] = []
    for run in range(runs):
        cache = work / f"cache-{run}"
        pull = [sys.executable, "-m", "neuron_serve.cli", "artifacts", "pull", url]
        seconds["neuron-serve artifacts pull"].append(timed(pull, env | {"NEURON_SERVE_CACHE": str(cache)}))
        if aws:
            copy = [aws, "s3", "cp", "--recursive", "--quiet", url, str(work / f"cli-{run}")]
            seconds["aws s3 cp --recursive"].append(timed(copy, env))
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/smollm2-135m-cpu"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = sum(f["size"] for f in read_manifest(args.artifacts).files.values())
    work = Path(tempfile.mkdtemp(prefix="cold-start-s3-"))
    s3 = S3Server(work / "moto.log")
    try:
        env = dict(os.environ) | s3.env
        create = "import boto3; boto3.client('s3').create_bucket(Bucket='bench')"
        subprocess.run([sys.executable, "-c", create], env=env, check=True)
        push = [sys.executable, "-m", "neuron_serve.cli", "artifacts", "push", str(args.artifacts), "s3://bench/a/"]
        url = subprocess.run(push, env=env, check=True, capture_output=True, text=True).stdout.strip()
        moved = transfers(url, env, work, args.runs)
        cold = {"local": [], "s3": []}
        for run in range(args.runs):
            local = serve_command(args.artifacts, free_port(), work / "profiles")
            cold["local"].append(measure_cold_start(local, env))
            remote = serve_command(url, free_port(), work / "profiles")
            cold["s3"].append(measure_cold_start(remote, env | {"NEURON_SERVE_CACHE": str(work / f"serve-{run}")}))
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"artifact: {size / 1e6:.1f} MB, {args.runs} run(s), medians, {os.cpu_count()} CPUs, S3 on loopback (moto)")
    for name, seconds in moved.items():
        print(f"  {name:<30} {seconds:6.2f} s  {size / seconds / 1e6:7.1f} MB/s")
    if "aws s3 cp --recursive" in moved:
        ratio = moved["aws s3 cp --recursive"] / moved["neuron-serve artifacts pull"]
        print(f"  pull rate / AWS CLI rate: {ratio:.2f} (goal >= {TRANSFER_GOAL})")
    medians = {name: median_run(runs) for name, runs in cold.items()}
    print(table(medians))
    if args.json:
        args.json.write_text(json.dumps({"transfers_s": moved, "size_bytes": size, "cold_start": medians}, indent=2))


if __name__ == "__main__":
    main()
