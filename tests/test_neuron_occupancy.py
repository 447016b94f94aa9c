"""Accelerator occupancy from neuron-monitor reports (a recorded sample; the tool itself needs Neuron)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from neuron_serve.backends.neuron.monitor import parse_report
from neuron_serve.backends.neuron.occupancy import parse_visible_cores, replica_occupancy, watch_monitor

SAMPLE = Path(__file__).parent / "data" / "neuron_monitor_sample.json"


def test_visible_core_ranges():
    assert parse_visible_cores("0-3") == [0, 1, 2, 3]
    assert parse_visible_cores("5") == [5]
    assert parse_visible_cores("0-1,4") == [0, 1, 4]


def test_occupancy_is_the_mean_over_this_replicas_cores():
    sample = parse_report(json.loads(SAMPLE.read_text().splitlines()[0]))
    utilization = sample.core_utilization
    cores = sorted(utilization)[:2]
    assert replica_occupancy(sample, cores) == sum(utilization[c] for c in cores) / 2 / 100
    assert replica_occupancy(sample, [999]) is None


def test_watch_follows_the_monitor_stream(tmp_path):
    # neuron-monitor exists only on Neuron hosts; a script that prints its recorded output stands in.
    script = tmp_path / "monitor.py"
    script.write_text(f"import sys; sys.stdout.write(open({str(SAMPLE)!r}).read() + 'partial {{')\n")
    seen: list[float] = []
    thread = watch_monitor(seen.append, "0-1", (sys.executable, str(script)))
    thread.join(timeout=30)
    reports = [parse_report(json.loads(line)) for line in SAMPLE.read_text().splitlines() if line.endswith("}")]
    expected = [replica_occupancy(report, [0, 1]) for report in reports]
    assert seen == [e for e in expected if e is not None] and seen


def test_missing_monitor_is_not_fatal():
    assert watch_monitor(lambda _: None, "0", ("neuron-monitor-not-installed",)) is None
