"""Progress that a log can read: a live display on a terminal, plain lines everywhere else.

A live bar or spinner redraws one line in place, and where standard error is a pipe or a file (Docker,
SageMaker's CloudWatch) rich draws nothing at all, so a log would show minutes of silence. Off a
terminal, `Progress` prints lines such as

    compile smollm2-135m-cpu: graph 3 of 12 (step_decode_8x256), 41 s elapsed, about 2 min left
    pull s3://b/p/NAME: 120.0 of 540.0 MB, 45.2 MB/s, 3 s elapsed, about 9 s left

the first and the last always and at most one every `interval` seconds between them, and `Phase` (a
long step with no count) prints a start line, a line every `interval` while it runs and an end line
with the time it took: a steady but bounded stream.

This module imports nothing else from the package, so that every layer may report progress.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import rich.progress
from rich.console import Console

BYTES = "bytes"  # Progress unit shown as MB and MB/s; any other unit is counted as "k of n"
ITEMS = "items"  # the plain count; another noun reads "graph 3 of 12"


def duration(seconds: float) -> str:
    """41 s, 4 min 2 s, 12 min, 1 h 5 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 10:
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def _plain(console: Console, line: str) -> None:
    # soft_wrap: one log line per report, however narrow the (non-)terminal; no markup in S3 keys.
    console.print(line, markup=False, highlight=False, soft_wrap=True)


class Progress:
    """Counted progress: ``with Progress(title, total, unit="bytes") as progress: progress.advance(n)``.

    `advance` may be called from any thread (s3transfer reports from its worker threads, negative
    amounts on a retried part included)."""

    def __init__(
        self, title: str, total: float, unit: str = ITEMS, *, interval: float = 5.0, console: Console | None = None
    ):
        self.title, self.total, self.unit, self.interval = title, total, unit, interval
        self.console = console or Console(stderr=True)
        self.done = 0.0
        self.detail = ""
        self._lock = threading.Lock()
        self._bar: rich.progress.Progress | None = None
        self._started = self._printed = 0.0

    def __enter__(self) -> Progress:
        self._started = self._printed = time.monotonic()
        if self.console.is_terminal:
            self._bar = rich.progress.Progress(*self._columns(), console=self.console)
            self._task = self._bar.add_task(self.title, total=self.total)
            self._bar.start()
        else:
            _plain(self.console, f"{self.title}: {self._count()}")
        return self

    def advance(self, amount: float = 1, detail: str = "") -> None:
        with self._lock:
            self.done += amount
            self.detail = detail or self.detail
            if self._bar is not None:
                self._bar.update(self._task, advance=amount, description=self._described())
                return
            now = time.monotonic()
            if now - self._printed >= self.interval and self.done < self.total:
                self._printed = now
                _plain(self.console, self._line(now))

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None):
        if self._bar is not None:
            self._bar.stop()  # the bar stays on the screen as it ended
            return
        now = time.monotonic()
        elapsed = duration(now - self._started)
        end = f"done in {elapsed}" if kind is None else f"stopped after {elapsed}"
        _plain(self.console, f"{self.title}: {self._state(now)}, {end}")

    def _line(self, now: float) -> str:
        """The report at time `now` (time.monotonic): count, detail, rate, elapsed, estimate."""
        elapsed = now - self._started
        parts = [self._state(now), f"{duration(elapsed)} elapsed"]
        if 0 < self.done < self.total:
            parts.append(f"about {duration(elapsed * (self.total - self.done) / self.done)} left")
        return f"{self.title}: {', '.join(parts)}"

    def _state(self, now: float) -> str:
        return self._count() + (f" ({self.detail})" if self.detail else "") + self._rate(now)

    def _count(self) -> str:
        done = max(self.done, 0)
        if self.unit == BYTES:
            return f"{done / 1e6:.1f} of {self.total / 1e6:.1f} MB"
        noun = "" if self.unit == ITEMS else f"{self.unit} "
        return f"{noun}{done:.0f} of {self.total:.0f}"

    def _rate(self, now: float) -> str:
        elapsed = now - self._started
        if self.unit != BYTES or elapsed <= 0 or self.done <= 0:
            return ""
        return f", {self.done / elapsed / 1e6:.1f} MB/s"

    def _described(self) -> str:
        return f"{self.title} ({self.detail})" if self.detail else self.title

    def _columns(self) -> list[rich.progress.ProgressColumn]:
        count = (
            [rich.progress.DownloadColumn(), rich.progress.TransferSpeedColumn()]
            if self.unit == BYTES
            else [rich.progress.MofNCompleteColumn()]
        )
        return [
            rich.progress.TextColumn("{task.description}"),
            rich.progress.BarColumn(),
            *count,
            rich.progress.TimeElapsedColumn(),
            rich.progress.TimeRemainingColumn(),
        ]


class Phase:
    """A long step with no count (quantizing, measuring quality, compiling a graph): a spinner on a
    terminal; elsewhere a start line, "N elapsed" every `interval` seconds, and an end line. On both,
    the end line stays, with the time the step took."""

    def __init__(self, title: str, *, interval: float = 30.0, console: Console | None = None):
        self.title, self.interval = title, interval
        self.console = console or Console(stderr=True)
        self._stop = threading.Event()
        self._started = 0.0

    def __enter__(self) -> Phase:
        self._started = time.monotonic()
        if self.console.is_terminal:
            self._status = self.console.status(self.title)
            self._status.start()
        else:
            _plain(self.console, self.title)
            self._ticker = threading.Thread(target=self._tick, name=f"phase {self.title}", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None):
        if self.console.is_terminal:
            self._status.stop()
        else:
            self._stop.set()
            self._ticker.join()
        elapsed = duration(time.monotonic() - self._started)
        _plain(self.console, f"{self.title}, {'done in' if kind is None else 'failed after'} {elapsed}")

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            _plain(self.console, f"{self.title}, {duration(time.monotonic() - self._started)} elapsed")
