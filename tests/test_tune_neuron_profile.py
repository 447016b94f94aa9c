"""neuron-profile summary-json parsing (tests/data/neuron_profile/README.md says where the fixtures come from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuron_serve.tune.neuron_profile import (
    NeuronProfileSummary,
    ProfileSchemaError,
    classify_bound,
    load_summary,
    parse_summary,
)

DATA = Path(__file__).parent / "data" / "neuron_profile"
DECODE = DATA / "llama31_8b_tp8_decode.json"
PREFILL = DATA / "llama31_8b_tp8_prefill.json"
MONITOR = DATA / "neuron_monitor_report.json"


def only(path: Path) -> NeuronProfileSummary:
    (summary,) = load_summary(path)
    return summary


def decode_fields() -> dict:
    (fields,) = json.loads(DECODE.read_text()).values()
    return fields


def test_decode_graph_is_bandwidth_bound() -> None:
    s = only(DECODE)
    assert s.profile_id == "n_7c1e94a03b5d"
    assert s.total_time_s == pytest.approx(0.006772)
    assert (s.hbm_read_bytes, s.hbm_write_bytes) == (2_144_142_336, 2_419_200)
    assert (s.spill_save_bytes, s.spill_reload_bytes) == (2_097_152, 2_097_152)
    assert (s.mfu, s.mbu, s.dma_active) == pytest.approx((0.013317, 0.720017, 0.940343))
    assert s.engine_active == pytest.approx(
        {"tensor": 0.339929, "vector": 0.470024, "scalar": 0.290018, "gpsimd": 0.110012, "sync": 0.059953}
    )
    assert s.hbm_bandwidth == pytest.approx(2_146_561_536 / 0.006772)  # ~317 GB/s
    assert s.bound == "bandwidth"


def test_prefill_graph_is_compute_bound() -> None:
    s = only(PREFILL)
    assert s.total_time_s == pytest.approx(0.09054)
    assert (s.spill_save_bytes, s.spill_reload_bytes) == (301_989_888, 301_989_888)
    assert (s.mfu, s.mbu) == pytest.approx((0.509966, 0.066784))
    assert s.engine_active["tensor"] == pytest.approx(0.779998)
    assert s.hbm_bandwidth == pytest.approx((2_326_332_416 + 335_608_448) / 0.09054)  # ~29 GB/s
    assert s.bound == "compute"


def test_parse_takes_text_or_decoded_object_and_every_profile() -> None:
    both = {"n_a": decode_fields(), "n_b": decode_fields()}
    assert [s.profile_id for s in parse_summary(json.dumps(both))] == ["n_a", "n_b"]
    assert parse_summary(both) == parse_summary(json.dumps(both).encode())


@pytest.mark.parametrize(
    ("mfu", "mbu", "bound"),
    [
        (0.05, 0.4, "bandwidth"),
        (0.4, 0.2, "compute"),
        (0.1, 0.1, "neither"),  # latency or instruction-issue bound
        (0.6, 0.6, "neither"),  # balanced near the ridge point
        (0.3, 0.7, "neither"),  # MFU not low enough to rule compute out
        (None, 0.7, "unknown"),
    ],
)
def test_classify_bound(mfu: float | None, mbu: float | None, bound: str) -> None:
    assert classify_bound(mfu, mbu) == bound


def test_negative_utilization_means_not_measured() -> None:
    fields = decode_fields() | {"mfu_estimated_percent": -1, "gpsimd_engine_active_time_percent": -1}
    (s,) = parse_summary({"n_x": fields})
    assert s.mfu is None and s.bound == "unknown"
    assert "gpsimd" not in s.engine_active


def test_other_tools_json_is_refused_naming_file_and_field() -> None:
    with pytest.raises(ProfileSchemaError) as e:
        load_summary(MONITOR)
    message = str(e.value)
    assert str(MONITOR) in message and "'neuron_runtime_data'" in message
    assert "summary-json" in message and "SDK 2.31" in message


def test_truncated_json_is_refused_naming_file(tmp_path: Path) -> None:
    cut = tmp_path / "cut.json"
    text = DECODE.read_text()
    cut.write_text(text[: len(text) // 2])
    with pytest.raises(ProfileSchemaError, match="not JSON") as e:
        load_summary(cut)
    assert str(cut) in str(e.value) and "summary-json" in str(e.value)


@pytest.mark.parametrize(
    ("change", "field", "why"),
    [
        ({"mbu_estimated_percent": None}, "mbu_estimated_percent", "missing field"),
        ({"total_time": "6.772ms"}, "total_time", "not a number"),
        ({"total_time": 0}, "total_time", "not seconds > 0"),
        ({"hbm_read_bytes": 2.1e9}, "hbm_read_bytes", "not a byte count"),
        ({"spill_save_bytes": True}, "spill_save_bytes", "not a number"),
        ({"dma_active_time_percent": 94.0}, "dma_active_time_percent", "fraction in"),
    ],
)
def test_bad_field_is_refused_naming_it(change: dict, field: str, why: str) -> None:
    fields = {k: v for k, v in (decode_fields() | change).items() if v is not None}
    with pytest.raises(ProfileSchemaError) as e:
        parse_summary({"n_x": fields}, source="decode.json")
    message = str(e.value)
    assert message.startswith("decode.json: entry 'n_x'") and repr(field) in message and why in message
    assert "summary-json" in message


@pytest.mark.parametrize(("obj", "why"), [([decode_fields()], "top level is an array"), ({}, "holds no profiles")])
def test_wrong_top_level_is_refused(obj: object, why: str) -> None:
    with pytest.raises(ProfileSchemaError, match=why):
        parse_summary(json.dumps(obj), source="x.json")
