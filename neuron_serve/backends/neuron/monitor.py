"""Per-NeuronCore utilization from ``neuron-monitor`` output.

neuron-monitor writes one complete JSON report per line, each period. The part read here
(Neuron Monitor User Guide, "The JSON output format")::

    {"neuron_runtime_data": [
        {"pid": 123, "neuron_runtime_tag": "worker0", "error": "",
         "report": {"neuroncore_counters": {
             "period": 1.0, "error": "",
             "neuroncores_in_use": {"0": {"neuroncore_utilization": 42.01, "flops": ...}, ...}}}}],
     "system_data": {...}, "instance_info": {...}, "neuron_hardware_info": {...}}

Each runtime is one process (one worker); its tag is NEURON_PROCESS_TAG, or its pid when unset
(tags need not be unique). Every process lists all the cores it can see, with 0 for cores it does
not use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RuntimeSample:
    """One Neuron process's view of one period: its utilization of each core it reports."""

    pid: int
    tag: str
    utilization: dict[int, float]


@dataclass
class MonitorSample:
    period_s: float
    runtimes: list[RuntimeSample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def core_utilization(self) -> dict[int, float]:
        """Percent busy per core, summed over processes.

        Each process lists every visible core, reporting 0 for the cores other processes own, so
        the sum is each core's owner's figure; overwriting by core index would lose it.
        """
        total: dict[int, float] = {}
        for rt in self.runtimes:
            for core, pct in rt.utilization.items():
                total[core] = total.get(core, 0.0) + pct
        return dict(sorted(total.items()))


def parse_report(report: dict[str, Any]) -> MonitorSample:
    """One neuron-monitor JSON report to a MonitorSample."""
    sample = MonitorSample(period_s=0.0)
    for runtime in report.get("neuron_runtime_data") or []:
        pid = int(runtime.get("pid", 0))
        tag = str(runtime.get("neuron_runtime_tag") or pid)
        if runtime.get("error"):
            sample.errors.append(f"{tag} (pid {pid}): {runtime['error']}")
        counters = (runtime.get("report") or {}).get("neuroncore_counters") or {}
        if counters.get("error"):
            sample.errors.append(f"{tag} (pid {pid}): neuroncore_counters: {counters['error']}")
        sample.period_s = max(sample.period_s, float(counters.get("period", 0.0)))
        in_use = counters.get("neuroncores_in_use") or {}
        util = {int(core): float(d.get("neuroncore_utilization") or 0.0) for core, d in in_use.items()}
        sample.runtimes.append(RuntimeSample(pid=pid, tag=tag, utilization=util))
    return sample
