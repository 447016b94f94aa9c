"""Cold start of `neuron-serve serve`: wall time from starting the process to the first `/ping` 200,
then to the first token of one streamed completion, with the server's own phases from `/metrics`
(`neuron_serve:cold_start_seconds`), against the goals.

    python -m benchmarks.cold_start [--artifacts artifacts/smollm2-135m-cpu] [--runs 3] [--json PATH]

Each run starts a fresh server on a free loopback port and stops it after the measurement. With
`--runs N` every figure is the median of the N runs. Another script (e.g. one that first downloads
the artifact) can call `measure_cold_start(command, env)` with its own command and add a column.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import requests
from prometheus_client.parser import text_string_to_metric_families

from neuron_serve.artifact.manifest import read_manifest

GOALS = {"ping": 5.0, "first_token": 1.0}  # seconds: to /ping 200 from process start, then to the first token
PROMPT = "The capital of France is"
COLD_START_METRIC = "neuron_serve:cold_start_seconds"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(target: str | Path, port: int, profile_dir: Path) -> list[str]:
    """`neuron-serve serve` as the console script runs it (the same interpreter, the same imports);
    the traffic profile it writes at shutdown goes to `profile_dir`, not the repository's profiles/."""
    return [
        *(sys.executable, "-m", "neuron_serve.cli", "serve", str(target)),
        *("--host", "127.0.0.1", "--port", str(port), "--profile-dir", str(profile_dir)),
    ]


def wait_for_ping(process: subprocess.Popen, base_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before /ping answered 200")
        try:
            if requests.get(f"{base_url}/ping", timeout=1).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet
            pass
        time.sleep(0.02)  # the polling interval bounds the error of the figure
    raise TimeoutError(f"/ping did not answer 200 within {timeout:.0f} s")


def first_token_at(base_url: str) -> float:
    """Stream one completion from the model the server lists first; the `perf_counter` time of its
    first token."""
    model = requests.get(f"{base_url}/v1/models", timeout=5).json()["data"][0]["id"]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(  # ignore_eos: a first token that ends the text still counts
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            at = time.perf_counter()
            stream.close()
            return at
    raise RuntimeError("the stream ended without a token")


def cold_start_phases(base_url: str) -> dict[str, float]:
    text = requests.get(f"{base_url}/metrics", timeout=5).text
    return {
        sample.labels["phase"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == COLD_START_METRIC
    }


def base_url_of(command: list[str]) -> str:
    return f"http://127.0.0.1:{command[command.index('--port') + 1]}"


def measure_cold_start(command: list[str], env: dict[str, str], timeout: float = 600) -> dict:
    """Run `command` (a server on 127.0.0.1 whose `--port` it names) and measure one cold start:
    {"ping": s from `Popen` to /ping 200, "first_token": s from then to the first token of one streamed
    completion, "phases": the server's own cold-start phases}. The server is stopped before returning."""
    base_url = base_url_of(command)
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_ping(process, base_url, timeout)
            ready = time.perf_counter()
            first_token = first_token_at(base_url) - ready
            return {"ping": ready - started, "first_token": first_token, "phases": cold_start_phases(base_url)}
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            process.terminate()
            process.wait(timeout=60)


def median_run(runs: list[dict]) -> dict:
    phases = sorted({phase for run in runs for phase in run["phases"]})
    return {
        "ping": statistics.median(run["ping"] for run in runs),
        "first_token": statistics.median(run["first_token"] for run in runs),
        "phases": {p: statistics.median(run["phases"].get(p, 0.0) for run in runs) for p in phases},
    }


def table(columns: dict[str, dict]) -> str:
    """One row per phase and one per total, one column per measured variant, then the goals."""
    phases = sorted({phase for result in columns.values() for phase in result["phases"]})
    rows = [(f"  {p}", [r["phases"].get(p) for r in columns.values()], None) for p in phases]
    rows += [
        ("process start to /ping 200", [r["ping"] for r in columns.values()], GOALS["ping"]),
        ("then to the first token", [r["first_token"] for r in columns.values()], GOALS["first_token"]),
    ]
    width = max(len(label) for label, _, _ in rows) + 2
    lines = [f"{'seconds':<{width}}" + "".join(f"{name:>12}" for name in columns) + f"{'goal':>8}"]
    for label, values, goal in rows:
        cells = "".join(f"{'-':>12}" if v is None else f"{v:>12.2f}" for v in values)
        lines.append(f"{label:<{width}}{cells}{'' if goal is None else f'{goal:>8.1f}'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/smollm2-135m-cpu"))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every run and the medians here")
    args = parser.parse_args()
    read_manifest(args.artifacts)  # a clear error before any server starts
    runs = []
    profiles = Path(tempfile.mkdtemp(prefix="cold-start-profiles-"))
    for index in range(args.runs):
        runs.append(measure_cold_start(serve_command(args.artifacts, free_port(), profiles), dict(os.environ)))
        print(f"run {index + 1}: /ping {runs[-1]['ping']:.2f} s, first token {runs[-1]['first_token']:.2f} s")
    local = median_run(runs)
    print(f"median of {args.runs} run(s), {os.cpu_count()} CPUs:")
    print(table({"local": local}))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": {"local": local}, "goals": GOALS}, indent=2))


if __name__ == "__main__":
    main()
