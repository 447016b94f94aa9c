"""Output tokens/s through HTTP/SSE (a real gunicorn server, measured by `neuron-serve bench`) against
the engine driven directly in this process, over a forward process as in a server worker, at the
same concurrency and workload; plus TTFT and ITL percentiles from the HTTP runs.

    python -m benchmarks.http_vs_engine ARTIFACTS [--concurrency 1,8,32] [--input-len 64] [--output-len 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from transformers import AutoTokenizer

from neuron_serve.backends.base import LoadTimes
from neuron_serve.engine.engine import Engine
from neuron_serve.engine.forward_process import ForwardProcess
from neuron_serve.engine.metrics import metrics_for
from neuron_serve.engine.sampler import SamplingParams
from neuron_serve.engine.sequence import Finished, Sequence
from tests.server_handle import ServerHandle


def engine_tokens_per_s(engine: Engine, tokenizer, concurrency: int, requests_n: int, input_len: int, output_len: int):
    """Closed loop: `concurrency` clients, each submitting its next request when the last finished."""
    prompt = [17 + i % 100 for i in range(input_len)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    produced = [0]
    lock = threading.Lock()

    def client(n: int) -> None:
        for _ in range(n):
            seq = Sequence(prompt, params, tokenizer, frozenset())
            engine.submit(seq)
            while not isinstance(seq.events.get(), Finished):
                pass
            with lock:
                produced[0] += len(seq.output_ids)

    per_client = max(1, requests_n // concurrency)
    threads = [threading.Thread(target=client, args=(per_client,)) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return produced[0] / (time.perf_counter() - started)


def http_levels(url: str, artifacts: Path, args) -> list[dict]:
    out = Path(tempfile.mkdtemp()) / "bench"
    command = [
        sys.executable,
        "-m",
        "neuron_serve.cli",
        "bench",
        "--base-url",
        url,
        "--tokenizer",
        str(artifacts / "tokenizer"),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--concurrency",
        args.concurrency,
        "--num-prompts",
        str(args.requests),
        "--output",
        str(out),
        "--no-progress",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())["levels"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32)
    args = parser.parse_args()

    server = ServerHandle(args.artifacts, ready_timeout=300)
    try:
        levels = http_levels(server.base_url, args.artifacts, args)
    finally:
        server.stop()
    runner = ForwardProcess(args.artifacts)
    runner.wait_ready(LoadTimes())
    engine = Engine(runner, metrics_for("engine-direct"), max_waiting=1024).start()
    tokenizer = AutoTokenizer.from_pretrained(args.artifacts / "tokenizer")
    print(
        f"{'conc':>4} {'engine tok/s':>12} {'http tok/s':>10} {'http/engine':>11} "
        f"{'TTFT p50/p99 ms':>16} {'ITL p50/p99 ms':>15}"
    )
    for level, concurrency in zip(levels, (int(c) for c in args.concurrency.split(",")), strict=True):
        direct = engine_tokens_per_s(engine, tokenizer, concurrency, args.requests, args.input_len, args.output_len)
        http = level["output_throughput"]
        ttft = f"{level['median_ttft_ms']:.0f}/{level['p99_ttft_ms']:.0f}"
        itl = f"{level['median_itl_ms']:.1f}/{level['p99_itl_ms']:.1f}"
        print(f"{concurrency:>4} {direct:>12.1f} {http:>10.1f} {http / direct:>10.0%} {ttft:>16} {itl:>15}")
    engine.stop()


if __name__ == "__main__":
    main()
