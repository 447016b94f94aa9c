"""/ping latency while clients hold half-sent requests open (slowloris), against the same server idle,
in one run.

    python -m benchmarks.slowloris ARTIFACTS [--connections 40] [--pings 20]

Each held connection sends a request line and one header, then waits. With gunicorn's plain gthread
worker, each one held a pool thread until it timed out; with `server/worker.py` the event loop holds
them and the threads stay free.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from pathlib import Path

import requests

from tests.server_handle import ServerHandle


def ping_ms(base_url: str, pings: int) -> list[float]:
    times = []
    for _ in range(pings):
        started = time.perf_counter()
        try:
            requests.get(f"{base_url}/ping", timeout=5).raise_for_status()
            times.append((time.perf_counter() - started) * 1000)
        except requests.RequestException:
            times.append(float("inf"))
    return times


def describe(label: str, times: list[float]) -> str:
    finite = [t for t in times if t != float("inf")]
    failed = len(times) - len(finite)
    median = statistics.median(finite) if finite else float("inf")
    return f"{label}: median {median:.1f} ms, max {max(times):.1f} ms, {failed} of {len(times)} timed out (5 s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--connections", type=int, default=40)
    parser.add_argument("--pings", type=int, default=20)
    args = parser.parse_args()
    server = ServerHandle(args.artifacts, ready_timeout=600)
    held = []
    try:
        print(describe("idle", ping_ms(server.base_url, args.pings)))
        for _ in range(args.connections):
            connection = socket.create_connection(("127.0.0.1", server.port))
            connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            held.append(connection)
        time.sleep(1)
        print(describe(f"{args.connections} half-sent requests held", ping_ms(server.base_url, args.pings)))
    finally:
        for connection in held:
            connection.close()
        server.stop()


if __name__ == "__main__":
    main()
