"""The compile stage: AOT graphs against the eager model, the compile cache, corrupt artifacts."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from conftest import tiny_recipe

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.artifact.manifest import CorruptArtifactError, read_manifest
from neuron_serve.backends.base import run_prompt
from neuron_serve.backends.cpu.precision import cpu_dtype, cpu_flags
from neuron_serve.backends.cpu.runners import EagerRunner, allocate_cache
from neuron_serve.backends.registry import open_runner
from neuron_serve.compiler.compile import compile_recipe
from neuron_serve.model.parallel import TensorParallel
from neuron_serve.model.step import PromptChunk, StepBatch
from neuron_serve.weights.loader import build_model

PROMPTS = {16: list(range(3, 14)), 32: list(range(40, 70)), "chunked": [(i * 11) % 380 + 2 for i in range(90)]}


def steps() -> list[StepBatch]:
    """Steps through every dimension: prompts alone, several in one step, a cut prompt continued beside
    decodes, decodes at both KV buckets and at 1, 2 and 4 rows."""
    long = PROMPTS["chunked"]
    return [
        StepBatch(chunks=[PromptChunk(0, 0, PROMPTS[16])]),
        StepBatch([0], [7], [11], [PromptChunk(1, 0, PROMPTS[32][:20]), PromptChunk(2, 0, long[:12])]),
        StepBatch([0, 1], [8, 3], [12, 20], [PromptChunk(2, 12, long[12:44])]),
        StepBatch([0], [9], [13], [PromptChunk(2, 44, long[44:70]), PromptChunk(3, 0, [5, 6])]),
        StepBatch([0, 3], [4, 5], [14, 2], [PromptChunk(2, 70, long[70:])]),
        StepBatch([0, 2, 3], [1, 2, 3], [15, 90, 3]),
        StepBatch([0], [1], [16]),
    ]


def test_the_aot_step_graph_matches_the_eager_model_at_every_bucket(tiny_artifacts, tiny_loaded):
    aot, manifest = open_runner(tiny_artifacts)
    eager = EagerRunner(build_model(tiny_loaded, aot.graphs.max_seq_len), aot.graphs)
    shapes = set()
    for batch in steps():
        ours = aot.step(batch)
        assert (ours.logits - eager.step(batch).logits).abs().max() < 1e-4, batch
        shapes.add(aot.graphs.step_shape(batch)[0])
    assert {s.decode_rows for s in shapes} == {1, 2, 4} and {s.kv_len for s in shapes} == {64, 128}
    assert {s.prompt_tokens for s in shapes} == {1, 16, 32} and {s.prompts for s in shapes} == {1, 2}


def test_recompiling_is_a_cache_hit_even_with_new_serving_settings(tiny_artifacts, tmp_path):
    recipe = tiny_recipe(**{"serve.port": 9999, "serve.workers": 2})
    result = compile_recipe(recipe, tmp_path / "again")
    assert all(graph.cache_hit for graph in result.manifest.graphs)
    assert result.manifest.files == read_manifest(tiny_artifacts).files


def test_the_step_graph_is_compiled_once_for_every_bucket_within_its_bounds(tiny_artifacts, tmp_path):
    same_bounds = compile_recipe(tiny_recipe(**{"shapes.context_buckets": [8, 32]}), tmp_path / "more-buckets")
    assert [graph.cache_hit for graph in same_bounds.manifest.graphs] == [True]
    more_slots = compile_recipe(tiny_recipe(**{"shapes.batch_size": 6}), tmp_path / "more-slots")
    assert [graph.cache_hit for graph in more_slots.manifest.graphs] == [False]


def test_weights_are_stored_once_for_all_graphs(tiny_artifacts):
    manifest = read_manifest(tiny_artifacts)
    weights = sum(manifest.files[name]["size"] for name in manifest.weights)
    parameters = sum(t.numel() * t.element_size() for t in _source_tensors().values())
    assert weights < parameters * 1.05
    for graph in manifest.graphs:  # code only: AOTInductor would put packaged weights under data/weights
        members = zipfile.ZipFile(tiny_artifacts / graph.file).namelist()
        assert not [m for m in members if "/data/weights/" in m or "/data/constants/" in m], graph.name


def _source_tensors():
    from neuron_serve.weights.loader import load_model_files

    return load_model_files("tiny").state_dict


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_artifact_file_is_named(tiny_artifacts, tmp_path, damage):
    copy = compile_recipe(tiny_recipe(), tmp_path / "copy").out_dir
    target = copy / "graphs" / "step.pt2"
    data = target.read_bytes()
    target.unlink()  # a new file: the cache entry behind the hard link stays intact
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        target.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    with pytest.raises(CorruptArtifactError, match=r"graphs/step\.pt2"):
        open_runner(copy)


def test_manifest_records_what_users_need(tiny_artifacts):
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "tiny-cpu"
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["toolchain"]["torch"] == torch.__version__
    for graph in manifest["graphs"]:
        assert graph["compile_seconds"] > 0 and graph["size_bytes"] > 0
        assert graph["file"] in manifest["files"]


def test_tensor_parallel_ranks_match_a_single_rank(tiny_artifacts, tmp_path):
    """TP=2 runs as two gloo processes; its logits equal TP=1's."""
    tp2 = compile_recipe(tiny_recipe(**{"target.tp_degree": 2, "compiler.cpu_mode": "eager"}), tmp_path / "tp2")
    single, _ = open_runner(tiny_artifacts)
    parallel, _ = open_runner(tp2.out_dir)
    try:
        for batch in steps():
            assert (parallel.step(batch).logits - single.step(batch).logits).abs().max() < 1e-4
        too_long = StepBatch(chunks=[PromptChunk(0, 0, [1] * parallel.graphs.max_seq_len)])
        with pytest.raises(ValueError, match="past the largest bucket"):  # every rank refuses it, and serves on
            parallel.step(too_long)
        assert (run_prompt(parallel, [4, 5], 0) - run_prompt(single, [4, 5], 0)).abs().max() < 1e-4
    finally:
        parallel.close()


def test_a_manifest_is_read_typed_and_only_its_structure_is_checked(tiny_artifacts, tmp_path):
    """A rule added after an artifact was compiled must not make it unreadable; a mangled recipe does."""
    copy = tmp_path / "copy"
    copy.mkdir()
    data = json.loads((tiny_artifacts / "manifest.json").read_text())
    data["recipe"]["serve"]["workers"] = 0  # breaks a rule today
    (copy / "manifest.json").write_text(json.dumps(data))
    manifest = read_manifest(copy)
    assert manifest.recipe.serve.workers == 0 and manifest.model_config.num_hidden_layers == 2
    data["recipe"]["serve"]["wrokers"] = 1
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CorruptArtifactError, match=r"(?s)unreadable manifest .*serve\.wrokers: unknown key"):
        read_manifest(copy)


def test_an_artifact_of_another_format_is_refused_with_what_to_do(tiny_artifacts, tmp_path):
    """A format-1 graph read the decode rows' KV bucket, which this runner no longer passes."""
    copy = tmp_path / "old"
    copy.mkdir()
    data = json.loads((tiny_artifacts / "manifest.json").read_text())
    data["format"] = 1
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CorruptArtifactError, match="artifact format 1, this neuron-serve reads format 2: compile"):
        read_manifest(copy)


def test_decode_only_steps_run_the_package_decode_graph(tiny_artifacts):
    aot, _ = open_runner(tiny_artifacts)
    assert aot.exact_decode_keys and aot.decode_package is not None
    calls = []
    run_decode = aot.run_decode
    aot.run_decode = lambda inputs: calls.append(inputs[0].shape[0]) or run_decode(inputs)
    for batch in steps():
        aot.step(batch)
    assert calls == [4, 1]  # the two steps without prompts, at their batch buckets


def test_auto_precision_is_chosen_at_compile_time_and_recorded(tmp_path):
    result = compile_recipe(tiny_recipe(**{"model.dtype": "auto", "compiler.cpu_mode": "eager"}), tmp_path / "auto")
    chosen, _ = cpu_dtype(cpu_flags())
    assert result.manifest.recipe.model.dtype == chosen
    assert read_manifest(result.out_dir).recipe.model.dtype == chosen


def test_bf16_is_chosen_only_where_the_cpu_multiplies_in_it(tmp_path):
    assert cpu_dtype({"avx2", "avx512_bf16"})[0] == "bfloat16"
    assert cpu_dtype({"amx_bf16", "amx_tile"})[0] == "bfloat16"
    dtype, why = cpu_dtype({"avx2", "fma"})
    assert dtype == "float32" and "emulated" in why
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}


def test_a_kv_cache_larger_than_the_free_memory_is_refused_with_the_figures(tiny_loaded):
    graphs = GraphSet(1_000_000, 128, (16,), (128,))
    with pytest.raises(MemoryError, match=r"the KV cache needs .* GiB \(shapes.batch_size 1000000 x .* GiB of memory"):
        allocate_cache(tiny_loaded.config, TensorParallel(), graphs, torch.float32)
    small = GraphSet(1, 128, (16,), (128,))
    with pytest.raises(MemoryError, match=r"the KV cache needs 0.00 GiB .* bf16 copies 4096.00 GiB"):
        allocate_cache(tiny_loaded.config, TensorParallel(), small, torch.bfloat16, weight_copies=2**42)
