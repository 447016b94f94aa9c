"""Progress a container log can read: off a terminal, plain lines (k of n, MB and MB/s, elapsed, the
estimate), bounded in number however many advances; and a real compile through a pipe reports each
phase with its time."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import time

from conftest import tiny_recipe
from rich.console import Console

from neuron_serve.progress import Phase, Progress, duration
from neuron_serve.recipe.files import save_recipe


def log() -> tuple[Console, io.StringIO]:
    """A console writing to a file, as stderr under Docker or SageMaker (not a terminal)."""
    stream = io.StringIO()
    return Console(file=stream, width=60), stream


def lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text, "a live display's control codes reached the log"
    return text.splitlines()


def test_counted_progress_reports_k_of_n_with_the_detail_and_an_estimate():
    console, stream = log()
    with Progress("compile smollm2-135m-cpu", 12, unit="graph", interval=0, console=console) as progress:
        for graph in range(12):
            time.sleep(0.01)
            progress.advance(detail=f"step_decode_{graph}")
    first, second, *_, last = lines(stream)
    assert first == "compile smollm2-135m-cpu: graph 0 of 12"
    assert re.fullmatch(
        r"compile smollm2-135m-cpu: graph 1 of 12 \(step_decode_0\), \d+ s elapsed, about \d+ s left", second
    )
    assert re.fullmatch(r"compile smollm2-135m-cpu: graph 12 of 12 \(step_decode_11\), done in \d+ s", last)


def test_bytes_from_many_threads_are_counted_once_each_in_a_bounded_number_of_lines():
    console, stream = log()
    total, threads, chunks = 540_000_000, 8, 2_000
    with Progress("pull s3://b/p/NAME", total, unit="bytes", interval=0.1, console=console) as progress:

        def transfer():
            for _ in range(chunks):
                progress.advance(total // (threads * chunks))
                time.sleep(0.0002)

        workers = [threading.Thread(target=transfer) for _ in range(threads)]
        started = time.monotonic()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds = time.monotonic() - started
    report = lines(stream)
    # 16,000 advances: the first line, one per interval at most, and the last.
    assert 3 <= len(report) <= 2 + seconds / 0.1 + 1, report
    assert report[0] == "pull s3://b/p/NAME: 0.0 of 540.0 MB"
    for line in report[1:-1]:
        assert re.fullmatch(
            r"pull s3://b/p/NAME: [\d.]+ of 540\.0 MB, [\d.]+ MB/s, \d+ s elapsed, about \d+ s left", line
        )
    assert re.fullmatch(r"pull s3://b/p/NAME: 540\.0 of 540\.0 MB, [\d.]+ MB/s, done in \d+ s", report[-1])


def test_a_failure_ends_the_log_with_where_it_stopped():
    console, stream = log()
    try:
        with Progress("push s3://b/p/NAME", 10_000_000, unit="bytes", console=console) as progress:
            progress.advance(4_000_000)
            raise OSError("connection reset")
    except OSError:
        pass
    assert re.fullmatch(r"push s3://b/p/NAME: 4\.0 of 10\.0 MB, [\d.]+ MB/s, stopped after 0 s", lines(stream)[-1])


def test_a_phase_prints_its_start_a_heartbeat_and_its_end():
    console, stream = log()
    started = time.monotonic()
    with Phase("compile x: measuring int8-weight's quality", interval=0.05, console=console):
        time.sleep(0.18)
    seconds = time.monotonic() - started
    start, *beats, end = lines(stream)
    assert start == "compile x: measuring int8-weight's quality"
    assert 1 <= len(beats) <= seconds / 0.05, beats
    assert all(re.fullmatch(r"compile x: measuring int8-weight's quality, \d+ s elapsed", beat) for beat in beats)
    assert re.fullmatch(r"compile x: measuring int8-weight's quality, done in \d+ s", end)


def test_durations_read_as_a_person_would_say_them():
    assert [duration(s) for s in (41.4, 242, 300, 725, 3900)] == ["41 s", "4 min 2 s", "5 min", "12 min", "1 h 5 min"]


def test_a_compile_with_stderr_to_a_pipe_reports_each_phase(tmp_path):
    """`neuron-serve compile` as under Docker: each phase gets a start and an end line. The model runs
    eager (no graph to compile: the AOT graph's "graph 1 of 1" is a `Phase` like these) and the weights
    are not quantized, so that this takes seconds (measuring a quantization's quality takes 20 s even on
    the tiny model)."""
    recipe = tmp_path / "tiny-cpu.toml"
    save_recipe(tiny_recipe(**{"compiler.cpu_mode": "eager"}), recipe)
    result = subprocess.run(
        [sys.executable, "-m", "neuron_serve.cli", "compile", str(recipe), "--out", str(tmp_path / "out")],
        env={**os.environ, "NEURON_SERVE_CACHE": str(tmp_path / "cache")},
        capture_output=True,  # stderr a pipe, as under Docker
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stderr
    phases = ["loading the weights from tiny", "sharding for TP=1"]
    expected = [line for phase in phases for line in (phase, phase + r", done in \d+ s")]
    # A slow machine may add "N elapsed" lines every 30 s; the phases and their order are the point.
    report = [
        line.removeprefix("compile tiny-cpu: ")
        for line in result.stderr.splitlines()
        if line.startswith("compile tiny-cpu: ") and not line.endswith(" elapsed")
    ]
    assert len(report) == len(expected), report
    assert all(re.fullmatch(pattern, line) for pattern, line in zip(expected, report, strict=True)), report
