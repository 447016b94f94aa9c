"""The device profile of one compiled graph, as ``neuron-profile`` summarizes it, in numbers the tuner uses.

Input: what ``neuron-profile view -n graph.neff -s profile.ntff --output-format summary-json`` prints
(``neuron-explorer view``, its successor since Neuron SDK 2.27, has the same option). The format has no
published JSON schema; what is known of it:

- Field names, types and units are the ``Summary`` table of the Neuron Explorer profile schema
  (aws-neuron-sdk ``tools/neuron-explorer/profile-schema-reference.rst``: profile schema 7.4.0, Neuron
  SDK 2.31.0). ``total_time`` is in seconds, byte counts are integers, every field is optional there.
- The top level is an object with one entry per processed profile, keyed by an opaque profile id, each
  a flat object of those fields. The docs only say "the summary ... as JSON"; the shape and the two
  points below come from public tools that read real captures.
- The ``*_percent`` fields are fractions in [0, 1] despite their name and the schema's "percent" unit
  (a capture's ``tensor_engine_active_time_percent`` equals ``tensor_engine_active_time / total_time``),
  and a negative value means "not measured". They are kept as fractions here.

The troubleshooting page says this output "may change between versions", so a file that does not
match is refused with :class:`ProfileSchemaError` rather than read with guesses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXPECTED = (
    "neuron-profile `view --output-format summary-json` output: an object of profile id -> Summary fields "
    "(Neuron SDK 2.31 profile schema 7.4.0, tools/neuron-explorer/profile-schema-reference.rst)"
)
ENGINE_FIELD = re.compile(r"^(?P<engine>[a-z0-9]+)_engine_active_time_percent$")

# Classification thresholds, as fractions of peak. A graph at >= 40% of one roof (HBM bandwidth for MBU,
# Tensor Engine FLOPs for MFU) while at <= 20% of the other is limited by the first: the other has 5x
# headroom, so only changes that move fewer bytes (or do fewer FLOPs) will speed it up. Tuned Neuron LLM
# graphs sit well past 40% on their limiting roof (decode MBU 0.6-0.8, prefill MFU 0.4-0.6).
BOUND_HIGH = 0.4
BOUND_LOW = 0.2
# Floating-point slack on fractions the profiler computes as ratios (active time / total time).
_FRACTION_SLACK = 1e-6


class ProfileSchemaError(ValueError):
    """A file or object that is not a neuron-profile summary-json this module can read."""


@dataclass(frozen=True)
class NeuronProfileSummary:
    """One profiled execution of one NEFF on one NeuronCore.

    Utilizations are fractions of peak in [0, 1] (the profiler's own scale); None where the profiler
    reports that it could not measure them. ``engine_active`` maps an engine name (``tensor``,
    ``vector``, ``scalar``, ``gpsimd``, ``sync``: whichever the profile reports) to the fraction of
    ``total_time`` it was executing an instruction.
    """

    profile_id: str
    total_time_s: float
    hbm_read_bytes: int
    hbm_write_bytes: int
    spill_save_bytes: int
    spill_reload_bytes: int
    mfu: float | None
    mbu: float | None
    dma_active: float | None
    engine_active: dict[str, float] = field(default_factory=dict)

    @property
    def hbm_bandwidth(self) -> float:
        """Achieved HBM bandwidth in bytes/s: (read + write) / total_time. MBU divides this by the peak
        of one HBM stack, which differs by instance type; this absolute number compares across them."""
        return (self.hbm_read_bytes + self.hbm_write_bytes) / self.total_time_s

    @property
    def bound(self) -> str:
        return classify_bound(self.mfu, self.mbu)


def classify_bound(mfu: float | None, mbu: float | None, high: float = BOUND_HIGH, low: float = BOUND_LOW) -> str:
    """Which roof limits a graph: "bandwidth" (MBU >= high, MFU <= low), "compute" (the opposite), "unknown"
    (either unmeasured), else "neither": both low (latency, instruction or DMA-issue bound) or both high
    (balanced at the ridge point)."""
    if mfu is None or mbu is None:
        return "unknown"
    if mbu >= high and mfu <= low:
        return "bandwidth"
    if mfu >= high and mbu <= low:
        return "compute"
    return "neither"


def load_summary(path: str | Path) -> list[NeuronProfileSummary]:
    """The profiles in a saved summary-json file (usually one)."""
    return parse_summary(Path(path).read_bytes(), source=str(path))


def parse_summary(
    text_or_obj: str | bytes | Mapping[str, Any], source: str = "<summary>"
) -> list[NeuronProfileSummary]:
    """The profiles in summary-json text, or in its already-decoded object; ``source`` names it in errors."""
    obj: Any = text_or_obj
    if isinstance(text_or_obj, str | bytes):
        try:
            obj = json.loads(text_or_obj)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _refuse(source, f"not JSON ({e})") from e
    if not isinstance(obj, Mapping):
        raise _refuse(source, f"top level is {_kind(obj)}, not an object of profiles")
    if not obj:
        raise _refuse(source, "holds no profiles")
    return [_parse_profile(str(key), fields, source) for key, fields in obj.items()]


def _parse_profile(profile_id: str, fields: Any, source: str) -> NeuronProfileSummary:
    where = f"{source}: entry {profile_id!r}"
    if not isinstance(fields, Mapping):
        raise _refuse(where, f"value is {_kind(fields)}, not an object of Summary fields")
    total_time = _number(fields, "total_time", where)
    if total_time <= 0:
        raise _refuse(where, f"field 'total_time' is {total_time}, not seconds > 0")
    engines = {}
    for name in fields:
        match = ENGINE_FIELD.match(name)
        if match and (active := _fraction(fields, name, where)) is not None:
            engines[match["engine"]] = active
    return NeuronProfileSummary(
        profile_id=profile_id,
        total_time_s=total_time,
        hbm_read_bytes=_byte_count(fields, "hbm_read_bytes", where),
        hbm_write_bytes=_byte_count(fields, "hbm_write_bytes", where),
        spill_save_bytes=_byte_count(fields, "spill_save_bytes", where),
        spill_reload_bytes=_byte_count(fields, "spill_reload_bytes", where),
        mfu=_fraction(fields, "mfu_estimated_percent", where),
        mbu=_fraction(fields, "mbu_estimated_percent", where),
        dma_active=_fraction(fields, "dma_active_time_percent", where),
        engine_active=engines,
    )


def _number(fields: Mapping[str, Any], name: str, where: str) -> float:
    if name not in fields:
        raise _refuse(where, f"missing field {name!r}")
    value = fields[name]
    # bool is an int to Python, never a measurement.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse(where, f"field {name!r} is {_kind(value)} ({value!r}), not a number")
    return float(value)


def _byte_count(fields: Mapping[str, Any], name: str, where: str) -> int:
    _number(fields, name, where)
    value = fields[name]
    if not isinstance(value, int) or value < 0:
        raise _refuse(where, f"field {name!r} is {value!r}, not a byte count (integer >= 0)")
    return value


def _fraction(fields: Mapping[str, Any], name: str, where: str) -> float | None:
    value = _number(fields, name, where)
    if value < 0:
        return None
    if value > 1 + _FRACTION_SLACK:
        # A 0-100 value would be another producer's (or a future version's) scale: refuse, not guess.
        raise _refuse(where, f"field {name!r} is {value}, not a fraction in [0, 1]")
    return min(value, 1.0)


def _refuse(where: str, problem: str) -> ProfileSchemaError:
    return ProfileSchemaError(f"{where}: {problem}; expected {EXPECTED}")


def _kind(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return kinds.get(type(value), "null" if value is None else type(value).__name__)
