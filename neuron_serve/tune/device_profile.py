"""A device profile: where each graph's time goes, and how close it runs to the device's limits.

``neuron-serve profile`` writes one, ``profiles/<deployment>/device-<UTC time>.json``, from either
source, and ``neuron-serve tune`` reads it:

- cpu: ``torch.profiler`` around each graph the traffic ran (``cpu_capture.py``), its operators and
  AOTInductor's kernels sorted into families by name (`family_of`);
- neuron: the summaries ``neuron-profile`` printed for each graph's NEFF (``neuron_profile.py``), whose
  MFU and MBU the profiler measured itself.

A graph's ``calls`` are how often the traffic ran it, so ``calls * seconds_per_call`` weighs the graphs
by the device time they took in service. This module owns the file's schema and the families.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from neuron_serve.tune.neuron_profile import NeuronProfileSummary, classify_bound

SCHEMA = "neuron-serve-device/1"
FAMILIES = ("matmul", "attention", "norm", "other", "outside kernels")
PHASES = ("decode", "prefill")

# Families by the words of an operator's or a fused kernel's name (AOTInductor names a fused kernel
# after the aten ops it fuses: cpp_fused__softmax_add_..., cpp_fused_add_mean_mul_pow_rsqrt_...).
# The first family with a word in the name wins: a kernel that fuses a softmax is attention even when
# it also adds, and the norm's rsqrt marks a kernel that fuses the residual add into the norm.
_FAMILY_WORDS = (
    ("attention", {"softmax", "scaled", "attention", "bmm", "sdpa"}),
    ("matmul", {"mm", "addmm", "linear", "matmul", "int8pack", "int4pack", "gemm"}),
    ("norm", {"rsqrt", "rmsnorm", "norm"}),
)


def family_of(name: str) -> str:
    """The operator family of a profiler event's name: matmul, attention, norm or other."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    for family, markers in _FAMILY_WORDS:
        if words & markers:
            return family
    return "other"


class DeviceProfileError(ValueError):
    """A file that is not a device profile of this schema."""


@dataclass
class GraphProfile:
    """One graph: how often the traffic ran it, its time per call and that time by family (seconds),
    what one call reads and computes, and its utilization of the device's limits (None: not measured)."""

    name: str
    phase: str  # decode or prefill
    calls: int
    seconds_per_call: float
    families: dict[str, float] = field(default_factory=dict)
    bytes_per_call: float = 0.0
    flops_per_call: float = 0.0
    mbu: float | None = None
    mfu: float | None = None
    spill_bytes: int = 0  # neuron: spill saves and reloads per call

    @property
    def device_seconds(self) -> float:
        return self.calls * self.seconds_per_call

    @property
    def bound(self) -> str:
        return classify_bound(self.mfu, self.mbu)


@dataclass
class DeviceProfile:
    """`limits`: the device's read bytes/s and FLOP/s that MBU and MFU divide by, and what they are."""

    deployment: str
    target: str
    limits: dict[str, float | str]
    graphs: list[GraphProfile]
    written_at: str = ""

    def write(self, directory: Path) -> Path:
        """Write ``directory/<deployment>/device-<UTC time>.json``; returns its path."""
        self.written_at = self.written_at or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = Path(directory) / self.deployment / f"device-{self.written_at}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"schema": SCHEMA, **asdict(self)}
        path.write_text(json.dumps(body, indent=1))
        return path

    @classmethod
    def read(cls, path: Path) -> DeviceProfile:
        try:
            body = json.loads(Path(path).read_text())
            if body.get("schema") != SCHEMA:
                raise DeviceProfileError(f"{path}: schema {body.get('schema')!r}, expected {SCHEMA!r}")
            graphs = [GraphProfile(**graph) for graph in body["graphs"]]
            return cls(body["deployment"], body["target"], dict(body["limits"]), graphs, body["written_at"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise DeviceProfileError(f"{path}: not a {SCHEMA} device profile ({type(e).__name__}: {e})") from e

    def phase(self, phase: str) -> PhaseSummary | None:
        """The graphs of one phase together, weighted by the device time each took (None: none ran)."""
        graphs = [g for g in self.graphs if g.phase == phase and g.device_seconds > 0]
        seconds = sum(g.device_seconds for g in graphs)
        if not seconds:
            return None
        shares = {f: sum(g.calls * g.families.get(f, 0.0) for g in graphs) / seconds for f in FAMILIES}

        def weighted(values: list[tuple[float | None, float]]) -> float | None:
            if any(value is None for value, _ in values):
                return None
            return sum(value * weight for value, weight in values) / seconds

        mbu = weighted([(g.mbu, g.device_seconds) for g in graphs])
        mfu = weighted([(g.mfu, g.device_seconds) for g in graphs])
        spills = sum(g.calls * g.spill_bytes for g in graphs)
        return PhaseSummary(phase, seconds, shares, mbu, mfu, spills)


@dataclass(frozen=True)
class PhaseSummary:
    phase: str
    seconds: float
    shares: dict[str, float]  # family -> fraction of the phase's time
    mbu: float | None
    mfu: float | None
    spill_bytes: int

    @property
    def bound(self) -> str:
        return classify_bound(self.mfu, self.mbu)

    def describe(self) -> str:
        shares = ", ".join(f"{family} {share:.0%}" for family, share in self.shares.items() if share >= 0.005)
        utilization = "MBU/MFU not measured"
        if self.mbu is not None and self.mfu is not None:
            utilization = f"MBU {self.mbu:.0%}, MFU {self.mfu:.0%} ({self.bound}-bound)"
        return f"{self.phase}: {self.seconds:.2f} s of device time; {shares}; {utilization}"


def from_neuron_summary(name: str, phase: str, calls: int, summary: NeuronProfileSummary) -> GraphProfile:
    """A graph's profile from neuron-profile's summary of one execution of its NEFF. The profiler does not
    split time by operator family; its engines' active time is the closest it has, so matmul is the
    Tensor Engine's share and the rest is "other"."""
    matmul = summary.engine_active.get("tensor", 0.0) * summary.total_time_s
    return GraphProfile(
        name=name,
        phase=phase,
        calls=calls,
        seconds_per_call=summary.total_time_s,
        families={"matmul": matmul, "other": summary.total_time_s - matmul},
        bytes_per_call=float(summary.hbm_read_bytes),
        mbu=summary.mbu,
        mfu=summary.mfu,
        spill_bytes=summary.spill_save_bytes + summary.spill_reload_bytes,
    )
