"""Load generation: closed-loop concurrency levels and open-loop Poisson (or gamma) arrivals.

Each level runs its requests on its own pool of worker threads: as many as the level's concurrency for a
closed loop (each thread sends its next request as soon as the last one ends), or as many as the
concurrency cap for an open loop (requests are released at their arrival times and wait for a free
thread, as behind a gateway that caps in-flight requests). Ctrl-C stops dispatching, cancels the
requests in flight, and hands back everything that had finished, so the caller can still write it.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import requests
from tqdm import tqdm

from neuron_serve.bench.client import RequestRecord, StreamingClient
from neuron_serve.bench.tokenizer import BenchTokenizer
from neuron_serve.bench.workload import BenchRequest

_CANCEL_GRACE_S = 5.0  # after Ctrl-C, how long in-flight requests get to notice and close their streams
_POLL_S = 0.2  # waits are sliced so that Ctrl-C reaches the main thread at once


@dataclass(frozen=True)
class LoadLevel:
    max_concurrency: int | None  # None: no cap (open loop only)
    request_rate: float = math.inf  # requests/s; inf: all released at once, i.e. a closed loop
    burstiness: float = 1.0  # gamma shape of the gaps between arrivals; 1 is a Poisson process

    @property
    def closed_loop(self) -> bool:
        return math.isinf(self.request_rate)

    @property
    def key(self) -> str:
        return f"c{self.max_concurrency}" if self.closed_loop else f"r{self.request_rate:g}"

    @property
    def label(self) -> str:
        if self.closed_loop:
            return f"concurrency {self.max_concurrency}"
        cap = f", max concurrency {self.max_concurrency}" if self.max_concurrency else ""
        return f"{self.request_rate:g} req/s{cap}"


@dataclass
class LevelRun:
    level: LoadLevel
    records: list[RequestRecord]  # every request that finished, successful or not; cancelled ones left out
    duration_s: float
    started_at: float  # perf_counter() at the start of the level
    cancelled: int
    interrupted: bool


def arrival_offsets(n: int, level: LoadLevel, rng: np.random.Generator) -> list[float]:
    """Release times (s from the level's start): all 0 for a closed loop, else gaps drawn from a gamma
    distribution of mean 1/rate (shape ``burstiness``: below 1 burstier than Poisson, above 1 steadier)."""
    if level.closed_loop or n == 0:
        return [0.0] * n
    if math.isinf(level.burstiness):
        gaps = np.full(n, 1.0 / level.request_rate)
    else:
        gaps = rng.gamma(shape=level.burstiness, scale=1.0 / (level.request_rate * level.burstiness), size=n)
    return [0.0] + np.cumsum(gaps[:-1]).tolist()


def run_level(
    client: StreamingClient,
    level: LoadLevel,
    reqs: list[BenchRequest],
    rng: np.random.Generator,
    progress: bool = True,
) -> LevelRun:
    n = len(reqs)
    todo: queue.Queue = queue.Queue()
    done: list[RequestRecord | None] = [None] * n
    stop = threading.Event()
    bar = tqdm(total=n, desc=level.label, unit="req", disable=not progress)
    threads = [
        threading.Thread(target=_worker, args=(client, todo, done, stop, bar), daemon=True)
        for _ in range(min(level.max_concurrency or n, n))
    ]
    started_at = time.perf_counter()
    for t in threads:
        t.start()
    interrupted = False
    try:
        _dispatch(todo, reqs, arrival_offsets(n, level, rng), started_at)
        _finish(todo, threads, deadline=math.inf)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
        _finish(todo, threads, deadline=time.perf_counter() + _CANCEL_GRACE_S)
    duration = time.perf_counter() - started_at
    bar.close()
    records = [r for r in done if r is not None and not r.cancelled]
    return LevelRun(level, records, duration, started_at, n - len(records), interrupted)


def _dispatch(todo: queue.Queue, reqs: list[BenchRequest], offsets: list[float], t0: float) -> None:
    for index, (req, offset) in enumerate(zip(reqs, offsets, strict=True)):
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        todo.put((index, req, time.perf_counter()))


def _finish(todo: queue.Queue, threads: list[threading.Thread], deadline: float) -> None:
    """Tells every worker to stop after the queued requests, and waits for them until ``deadline``."""
    for _ in threads:
        todo.put(None)
    for t in threads:
        while t.is_alive() and time.perf_counter() < deadline:
            t.join(_POLL_S)


def _worker(
    client: StreamingClient,
    todo: queue.Queue,
    done: list[RequestRecord | None],
    stop: threading.Event,
    bar: tqdm,
) -> None:
    session = requests.Session()  # one per thread: a Session is not safe to share between threads
    while (item := todo.get()) is not None:
        index, req, arrival = item
        if stop.is_set():
            continue
        try:
            rec = client.send(session, req, index, stop)
        except Exception as exc:  # a benchmark counts what went wrong and goes on; no request may end it
            rec = RequestRecord(index, req.prompt_len, req.max_tokens, error_type=type(exc).__name__)
            rec.error = str(exc)[:300]
        rec.arrival_time = arrival
        done[index] = rec
        with bar.get_lock():  # tqdm's counter is not thread-safe on its own
            bar.update(1)
    session.close()


def fill_output_tokens(records: list[RequestRecord], tok: BenchTokenizer | None) -> None:
    """Output lengths for servers that send no usage: the text re-tokenized, else one token per chunk."""
    for rec in records:
        if not rec.success or rec.output_tokens is not None:
            continue
        if tok is not None:
            rec.output_tokens, rec.output_tokens_source = len(tok.encode(rec.generated_text)), "tokenizer"
        else:
            rec.output_tokens, rec.output_tokens_source = 1 + len(rec.itl), "chunks"


def run_sweep(
    client: StreamingClient,
    levels: list[LoadLevel],
    make_requests: Callable[[int], list[BenchRequest]],
    tok: BenchTokenizer | None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[LevelRun], bool]:
    """Runs the levels in order; returns their runs and whether Ctrl-C cut the sweep short."""
    runs: list[LevelRun] = []
    for i, level in enumerate(levels):
        try:
            reqs = make_requests(i)
        except KeyboardInterrupt:
            return runs, True
        run = run_level(client, level, reqs, np.random.default_rng([seed, i]), progress)
        fill_output_tokens(run.records, tok)
        runs.append(run)
        if run.interrupted:
            return runs, True
    return runs, False
