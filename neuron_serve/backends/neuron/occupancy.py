"""Accelerator occupancy of one replica on Neuron: neuron-monitor's `neuroncore_utilization`,
averaged over the NeuronCores in this worker's NEURON_RT_VISIBLE_CORES, as a fraction."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence

from neuron_serve.backends.neuron.monitor import MonitorSample, parse_report

log = logging.getLogger("neuron_serve.backends.neuron")


def parse_visible_cores(value: str) -> list[int]:
    """NEURON_RT_VISIBLE_CORES: "3", "0-7" or a comma list of either."""
    cores: list[int] = []
    for part in value.split(","):
        first, _, last = part.strip().partition("-")
        cores.extend(range(int(first), int(last or first) + 1))
    return cores


def replica_occupancy(sample: MonitorSample, cores: Sequence[int]) -> float | None:
    utilization = sample.core_utilization
    seen = [utilization[c] for c in cores if c in utilization]
    return sum(seen) / len(seen) / 100.0 if seen else None


def watch_monitor(
    set_occupancy: Callable[[float], None], visible_cores: str, command: Sequence[str] = ("neuron-monitor",)
) -> threading.Thread | None:
    """Follow neuron-monitor's reports in a daemon thread; None (and a warning) where it is absent."""
    if shutil.which(command[0]) is None:
        log.warning("%s not found: accelerator occupancy will not be reported", command[0])
        return None
    cores = parse_visible_cores(visible_cores)
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, text=True)

    def follow() -> None:
        for line in process.stdout:
            try:
                occupancy = replica_occupancy(parse_report(json.loads(line)), cores)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a partial line when the monitor stops, or a report with an error
            if occupancy is not None:
                set_occupancy(occupancy)

    thread = threading.Thread(target=follow, name="neuron-monitor", daemon=True)
    thread.start()
    return thread
