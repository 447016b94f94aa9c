"""The Neuron side's pure Python: compiler flags, core ranges, neuron-monitor parsing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from neuron_serve.backends.neuron.flags import neuronx_cc_flags
from neuron_serve.backends.neuron.monitor import parse_report
from neuron_serve.recipe.files import load_recipe

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "compile" / "llama-3.1-8b-inf2.48xlarge.toml"
MONITOR_SAMPLE = ROOT / "tests" / "data" / "neuron_monitor_sample.json"


def test_flags_for_the_llama_example():
    assert neuronx_cc_flags(load_recipe(LLAMA)) == [
        "--target=inf2",
        "--model-type=transformer",
        "--auto-cast=matmult",
        "--auto-cast-type=bf16",
        "-O2",
        "--enable-saturate-infinity",
        "--enable-fast-loading-neuron-binaries",
    ]


def test_flags_follow_the_compiler_section_and_extra_flags_come_last():
    r = load_recipe(LLAMA)
    r.target = dataclasses.replace(r.target, instance="trn1.32xlarge")
    r.compiler = dataclasses.replace(
        r.compiler,
        auto_cast="none",
        optlevel=3,
        fast_loading=False,
        extra_flags=["--auto-cast=all", "--verbose=info"],
    )
    # no --auto-cast-type without casting; extra flags last so that they win (right-most flag wins)
    assert neuronx_cc_flags(r) == [
        "--target=trn1",
        "--model-type=transformer",
        "--auto-cast=none",
        "-O3",
        "--enable-saturate-infinity",
        "--auto-cast=all",
        "--verbose=info",
    ]


def test_flags_refuse_cpu_recipes():
    with pytest.raises(ValueError, match="targets 'cpu'"):
        neuronx_cc_flags(load_recipe(ROOT / "compile" / "tiny-cpu.toml"))


def test_monitor_sample_per_core_utilization():
    *complete, partial = MONITOR_SAMPLE.read_text().splitlines()  # the capture ends mid-report
    with pytest.raises(json.JSONDecodeError):
        json.loads(partial)
    samples = [parse_report(json.loads(line)) for line in complete]
    assert len(samples) == 3
    first = samples[0]
    assert first.period_s == pytest.approx(1.000113182)
    assert [(rt.tag, rt.pid) for rt in first.runtimes] == [
        ("neuron-serve-w0", 20843),
        ("neuron-serve-w1", 20851),
    ]
    # each process lists both cores (0 for the other worker's); the per-core figure is the owner's
    assert first.core_utilization == {0: 71.25, 1: 64.5}
    assert [s.core_utilization for s in samples[1:]] == [{0: 83.75, 1: 70.0}, {0: 77.0, 1: 68.5}]


def test_monitor_reports_errors_and_untagged_runtimes():
    report = {
        "neuron_runtime_data": [
            {
                "pid": 77,
                "neuron_runtime_tag": "",
                "error": "runtime gone",
                "report": {
                    "neuroncore_counters": {
                        "period": 5.0,
                        "neuroncores_in_use": {"3": {"neuroncore_utilization": 12.5}},
                        "error": "partial data",
                    }
                },
            },
        ]
    }
    sample = parse_report(report)
    assert sample.runtimes[0].tag == "77"  # no NEURON_PROCESS_TAG: neuron-monitor's tag is the pid
    assert sample.core_utilization == {3: 12.5}
    assert sample.errors == ["77 (pid 77): runtime gone", "77 (pid 77): neuroncore_counters: partial data"]
