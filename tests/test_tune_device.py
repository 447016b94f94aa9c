"""Device profiles: captured on the cpu with torch.profiler, read from neuron-profile summaries, and the
recipe changes `tune` makes (or only advises) from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from neuron_serve.artifact.traffic import TrafficProfile
from neuron_serve.cli import main
from neuron_serve.recipe.files import load_recipe
from neuron_serve.tune.cpu_capture import capture
from neuron_serve.tune.device_profile import DeviceProfile, DeviceProfileError, GraphProfile, family_of
from neuron_serve.tune.device_rules import tune_from_device
from neuron_serve.tune.plan import Roofline

REPO = Path(__file__).resolve().parent.parent
NEURON_RECIPE = REPO / "compile" / "llama-3.1-8b-inf2.48xlarge.toml"
CPU_RECIPE = REPO / "compile" / "smollm2-135m-cpu.toml"
SUMMARIES = Path(__file__).resolve().parent / "data" / "neuron_profile"


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("aoti_torch_cpu_mm_out", "matmul"),
        ("neuron_serve::int8_weight_linear", "matmul"),
        ("aten::_weight_int8pack_mm", "matmul"),
        ("aoti_torch_cpu__scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("graph_0_cpp_fused__softmax_add_arange_ge_masked_fill_3", "attention"),
        ("aoti_torch_cpu_bmm_out", "attention"),
        ("graph_0_cpp_fused_add_clone_embedding_mean_mul_pow_rsqrt_0", "norm"),
        ("graph_0_cpp_fused_mul_silu_t_view_8", "other"),
        ("aten::index_put_", "other"),
        ("aten::addmm", "matmul"),
        ("graph_0_cpp_fused_commit_3", "other"),  # "mm" inside a word is not a matmul
    ],
)
def test_operators_and_fused_kernels_fall_in_their_family(name, family):
    assert family_of(name) == family


def graph(name, phase, calls, seconds, attention, mbu=0.7, mfu=0.05, spill=0):
    families = {"attention": attention * seconds, "matmul": (1 - attention) * seconds}
    return GraphProfile(name, phase, calls, seconds, families, 1e9, 1e9, mbu, mfu, spill)


def test_a_profile_survives_its_file_and_weighs_graphs_by_their_device_time(tmp_path):
    # 90 calls of 10 ms at 50 % attention and 10 calls of 100 ms at 10 %: 0.9 s and 1 s of device time.
    profile = DeviceProfile(
        "d", "cpu", {"name": "cpu host"}, [graph("a", "decode", 90, 0.01, 0.5), graph("b", "decode", 10, 0.1, 0.1)]
    )
    read = DeviceProfile.read(profile.write(tmp_path))
    assert read == profile
    decode = read.phase("decode")
    assert decode.seconds == pytest.approx(1.9)
    assert decode.shares["attention"] == pytest.approx((0.45 + 0.1) / 1.9)
    assert read.phase("prefill") is None


def test_a_file_of_another_schema_is_refused_with_its_name(tmp_path):
    path = tmp_path / "device-x.json"
    path.write_text(json.dumps({"schema": "neuron-serve-traffic/1"}))
    with pytest.raises(DeviceProfileError, match=r"device-x.json: schema 'neuron-serve-traffic/1', expected"):
        DeviceProfile.read(path)


def test_on_neuron_attention_heavy_decode_enables_the_fused_kernel_and_stalled_decode_raises_O():
    recipe = load_recipe(NEURON_RECIPE)
    assert "decode_attention" not in recipe.kernels.enabled and recipe.compiler.optlevel < 3
    device = DeviceProfile("d", "neuron", {}, [graph("step_8x1x1x4096", "decode", 1, 0.01, 0.4, mbu=0.1, mfu=0.05)])
    tuned, changes, advice = tune_from_device(recipe, device)
    by_field = {c.field: c for c in changes}
    assert (
        tuned.kernels.enabled[-1] == "decode_attention"
        and "attention takes 40% of decode" in by_field["kernels.enabled"].reason
    )
    assert tuned.compiler.optlevel == 3 and "MBU 10%, MFU 5%" in by_field["compiler.optlevel"].reason


def test_on_cpu_the_kernel_stays_off_and_a_bandwidth_bound_decode_only_gets_advice():
    recipe = load_recipe(CPU_RECIPE)
    recipe.quantization.method = "none"
    device = DeviceProfile("d", "cpu", {}, [graph("step_decode_8x1024", "decode", 10, 0.05, 0.6, mbu=0.6, mfu=0.1)])
    tuned, changes, advice = tune_from_device(recipe, device)
    assert tuned == recipe
    (change,) = changes
    assert not change.changed and "no faster than torch's" in change.reason
    assert any("bandwidth-bound (MBU 60%, MFU 10%)" in a and "int8-weight" in a for a in advice)


def test_neuron_profile_summaries_become_a_device_profile(tiny_artifacts, tmp_path, capsys):
    """`profile --neuron-summaries` reads one summary-json per graph, named after the graph."""
    summaries = tmp_path / "summaries"
    summaries.mkdir()
    shutil.copy(SUMMARIES / "llama31_8b_tp8_decode.json", summaries / "step_8x1x1x4096.json")
    shutil.copy(SUMMARIES / "llama31_8b_tp8_prefill.json", summaries / "step_8x128x8x4096.json")
    out_dir = tmp_path / "profiles"
    code = main(["profile", str(tiny_artifacts), "--neuron-summaries", str(summaries), "--out-dir", str(out_dir)])
    out = capsys.readouterr()
    assert code == 0, out.err
    (path,) = (out_dir / "tiny-cpu").glob("device-*.json")
    device = DeviceProfile.read(path)
    assert {g.name: g.phase for g in device.graphs} == {"step_8x1x1x4096": "decode", "step_8x128x8x4096": "prefill"}
    decode = next(g for g in device.graphs if g.phase == "decode")
    assert decode.mbu == pytest.approx(0.720017) and decode.spill_bytes == 2 * 2097152
    assert "decode: " in out.out and "MBU 72%" in out.out


def test_summaries_not_named_after_a_graph_are_refused(tiny_artifacts, tmp_path, capsys):
    shutil.copy(SUMMARIES / "llama31_8b_tp8_decode.json", tmp_path / "decode.json")
    assert main(["profile", str(tiny_artifacts), "--neuron-summaries", str(tmp_path)]) == 2
    assert "decode.json: not named after a neuron graph" in capsys.readouterr().err


def test_the_cpu_capture_profiles_each_graph_the_traffic_ran(tiny_artifacts):
    traffic = TrafficProfile("tiny-cpu", graphs={"step_decode_2x64": (30, 40), "step_prompt_32": (50, 64)})
    limits = Roofline("test host", 10e9, 50e9)
    device = capture(tiny_artifacts, traffic, repeats=2, limits=limits)
    by_name = {g.name: g for g in device.graphs}
    decode, prompt = by_name["step_decode_2x64"], by_name["step_prompt_32"]
    assert (decode.phase, decode.calls, prompt.phase, prompt.calls) == ("decode", 20, "prefill", 2)
    for g in (decode, prompt):
        assert g.seconds_per_call > 0 and sum(g.families.values()) == pytest.approx(g.seconds_per_call)
        # AOTInductor's kernels are visible to the profiler: the graph's own matmuls and attention.
        assert g.families["matmul"] > 0 and g.families["attention"] > 0
        assert g.mbu == pytest.approx(g.bytes_per_call / g.seconds_per_call / 10e9)
        assert g.mfu == pytest.approx(g.flops_per_call / g.seconds_per_call / 50e9)
    # A 32-token prompt computes 16x the tokens of 2 decode rows, over the same weights.
    assert prompt.flops_per_call / decode.flops_per_call > 10
    assert device.limits == {"name": "test host", "bytes_per_s": 10e9, "flops_per_s": 50e9}


def test_the_profile_command_measures_the_host_and_writes_the_file(tiny_artifacts, tmp_path, capsys):
    assert main(["profile", str(tiny_artifacts), "--repeats", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (path,) = (tmp_path / "tiny-cpu").glob("device-*.json")
    device = DeviceProfile.read(path)
    assert device.limits["bytes_per_s"] > 1e9 and device.limits["flops_per_s"] > 1e9
    # Without traffic: one decode graph per KV bucket and one prompt graph per context bucket.
    assert sorted(g.name for g in device.graphs) == [
        "step_decode_4x128",
        "step_decode_4x64",
        "step_prompt_16",
        "step_prompt_32",
    ]
    assert "decode: " in out and "prefill: " in out and f"Wrote {path}" in out
