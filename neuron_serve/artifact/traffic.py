"""A traffic profile: what a deployment served, as histograms of counts (never prompt text).

The server records these histograms as Prometheus metrics (``engine/metrics.py``, summed over
gunicorn workers by prometheus-client's multiprocess mode) and writes them as one JSON file,
``profiles/<deployment>/traffic-<UTC time>.json``, on demand and at shutdown; ``neuron-serve tune``
reads them. This module owns the file's schema and the histograms' names and bins.

Lengths are binned: a bin's observations are counted at its upper bound, so a bucket fitted to them
may pad each observation by up to one bin width (16 tokens) more than it would exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "neuron-serve-traffic/1"
LENGTH_STEP = 16
# Token counts and KV lengths: every 16 tokens to 4096, then coarser up to Llama 3.1's 128K.
LENGTH_BINS = (*range(LENGTH_STEP, 4097, LENGTH_STEP), 6144, 8192, 16384, 32768, 65536, 131072)
ROW_BINS = tuple(range(1, 257))  # decode rows and running requests: slots, one by one

# name -> (what one observation is, its bins)
HISTOGRAMS = {
    "request_prompt_tokens": ("a request's prompt tokens, when it is admitted", LENGTH_BINS),
    "request_generation_tokens": ("a finished request's generated tokens", LENGTH_BINS),
    "engine_step_prompt_tokens": ("an engine step's prompt tokens (the context bucket's measure)", LENGTH_BINS),
    "engine_step_kv_length": ("the KV length an engine step attends (the KV bucket's measure)", LENGTH_BINS),
    "engine_step_decode_rows": ("an engine step's decode rows, up to its highest decoding slot", ROW_BINS),
    "engine_step_running": ("requests holding a slot, per engine step (concurrency)", ROW_BINS),
}


# The server's own latency and step-size histograms (their bins are engine/metrics.py's), which a profile
# carries too.
TTFT, ITL, QUEUE_TIME = "time_to_first_token_seconds", "inter_token_latency_seconds", "request_queue_time_seconds"
STEP_TOKENS = "engine_step_tokens"


class TrafficProfileError(ValueError):
    """A file that is not a traffic profile of this schema."""


@dataclass
class Binned:
    """One histogram: counts per bin (not cumulative), the count past the last bin and the sum."""

    bounds: tuple[float, ...]
    counts: list[int]
    overflow: int = 0
    total: float = 0.0

    def quantile(self, q: float) -> float:
        """The upper bound of the bin that holds the q-quantile (inf past the last bin, nan when empty)."""
        seen, rank = 0, q * self.observations
        for bound, count in zip(self.bounds, self.counts, strict=True):
            seen += count
            if count and seen >= rank:
                return float(bound)
        return float("inf") if self.overflow else float("nan")

    def quantile_bounds(self, q: float) -> tuple[float, float]:
        """(lower, upper] bounds of the bin that holds the q-quantile: the quantile lies between them."""
        upper = self.quantile(q)
        lower = max((b for b in self.bounds if b < upper), default=0.0)
        return float(lower), upper

    def by_length(self) -> dict[int, int]:
        """{bin upper bound: count} of the non-empty bins, for fitting buckets."""
        return {int(b): c for b, c in zip(self.bounds, self.counts, strict=True) if c}

    @property
    def observations(self) -> int:
        return sum(self.counts) + self.overflow


@dataclass
class TrafficProfile:
    """`histograms` by metric name (the ones above, and the server's latency histograms); `graphs`: each
    graph's (real, padded) token slots, the padding of every bucket the engine ran."""

    deployment: str
    histograms: dict[str, Binned] = field(default_factory=dict)
    written_at: str = ""
    graphs: dict[str, tuple[int, int]] = field(default_factory=dict)

    def write(self, directory: Path) -> Path:
        """Write ``directory/<deployment>/traffic-<UTC time>.json``; returns its path."""
        self.written_at = self.written_at or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = Path(directory) / self.deployment / f"traffic-{self.written_at}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "schema": SCHEMA,
            "deployment": self.deployment,
            "written_at": self.written_at,
            "histograms": {
                name: {"bounds": list(h.bounds), "counts": h.counts, "overflow": h.overflow, "sum": h.total}
                for name, h in self.histograms.items()
            },
            "graphs": {name: {"real": real, "padded": padded} for name, (real, padded) in self.graphs.items()},
        }
        path.write_text(json.dumps(body, indent=1))
        return path

    @classmethod
    def read(cls, path: Path) -> TrafficProfile:
        try:
            body = json.loads(Path(path).read_text())
            if body.get("schema") != SCHEMA:
                raise TrafficProfileError(f"{path}: schema {body.get('schema')!r}, expected {SCHEMA!r}")
            histograms = {
                name: Binned(tuple(h["bounds"]), list(h["counts"]), int(h["overflow"]), float(h["sum"]))
                for name, h in body["histograms"].items()
            }
            graphs = {name: (int(g["real"]), int(g["padded"])) for name, g in body.get("graphs", {}).items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise TrafficProfileError(f"{path}: not a {SCHEMA} traffic profile ({type(e).__name__}: {e})") from e
        return cls(body["deployment"], histograms, body["written_at"], graphs)

    def merged(self, other: TrafficProfile) -> TrafficProfile:
        """Both profiles' counts added (profiles of the same deployment over time)."""
        histograms = dict(self.histograms)
        for name, h in other.histograms.items():
            mine = histograms.get(name)
            if mine is None:
                histograms[name] = h
                continue
            if mine.bounds != h.bounds:
                raise TrafficProfileError(f"histogram {name}: the profiles bin it differently")
            counts = [a + b for a, b in zip(mine.counts, h.counts, strict=True)]
            histograms[name] = Binned(mine.bounds, counts, mine.overflow + h.overflow, mine.total + h.total)
        graphs = dict(self.graphs)
        for name, (real, padded) in other.graphs.items():
            mine_real, mine_padded = graphs.get(name, (0, 0))
            graphs[name] = (mine_real + real, mine_padded + padded)
        return TrafficProfile(self.deployment, histograms, max(self.written_at, other.written_at), graphs)
