"""The compile stage: AOT graphs against the eager model, the compile cache, corrupt artifacts."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from conftest import tiny_recipe

from neuron_serve.artifact.manifest import CorruptArtifactError, read_manifest
from neuron_serve.backends.cpu.runners import EagerRunner
from neuron_serve.backends.registry import open_runner
from neuron_serve.compiler.compile import compile_recipe
from neuron_serve.weights.loader import build_model

PROMPTS = {16: list(range(3, 14)), 32: list(range(40, 70)), "chunked": [(i * 11) % 380 + 2 for i in range(90)]}


def test_aot_graphs_match_the_eager_model_in_every_bucket(tiny_artifacts, tiny_loaded):
    aot, manifest = open_runner(tiny_artifacts)
    eager = EagerRunner(build_model(tiny_loaded, aot.graphs.max_seq_len), aot.graphs)
    graphs_run = set()
    for slot, prompt in enumerate(PROMPTS.values()):
        ours = aot.prefill(prompt, slot)
        assert (ours.logits - eager.prefill(prompt, slot).logits).abs().max() < 1e-4
        graphs_run |= {use.graph for use in ours.uses}
    assert graphs_run == {"prefill_16", "prefill_32", "prefill_chunk_32"}
    for positions in ([11, 30, 50, 0], [70, 30, 100, 0]):  # decode_64, then decode_128
        tokens = [7, 8, 9, 0]
        ours = aot.decode(tokens, positions, active=3)
        assert (ours.logits - eager.decode(tokens, positions, active=3).logits).abs().max() < 1e-4
        graphs_run |= {use.graph for use in ours.uses}
    assert {"decode_64", "decode_128"} <= graphs_run


def test_recompiling_is_a_cache_hit_even_with_new_serving_settings(tiny_artifacts, tmp_path):
    recipe = tiny_recipe(**{"serve.port": 9999, "serve.workers": 2})
    result = compile_recipe(recipe, tmp_path / "again")
    assert all(graph.cache_hit for graph in result.manifest.graphs)
    assert result.manifest.files == read_manifest(tiny_artifacts).files


def test_a_changed_bucket_recompiles_only_its_graph(tiny_artifacts, tmp_path):
    result = compile_recipe(tiny_recipe(**{"shapes.token_buckets": [96, 128]}), tmp_path / "new-bucket")
    misses = [graph.name for graph in result.manifest.graphs if not graph.cache_hit]
    assert misses == ["decode_96"]


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
    target = copy / "graphs" / "decode_64.pt2"
    data = target.read_bytes()
    target.unlink()  # a new file: the cache entry behind the hard link stays intact
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        target.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    with pytest.raises(CorruptArtifactError, match=r"graphs/decode_64\.pt2"):
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
        for slot, prompt in enumerate(PROMPTS.values()):
            assert (parallel.prefill(prompt, slot).logits - single.prefill(prompt, slot).logits).abs().max() < 1e-4
        step = ([5, 6, 7, 0], [11, 30, 90, 0], 3)
        assert (parallel.decode(*step).logits - single.decode(*step).logits).abs().max() < 1e-4
        with pytest.raises(ValueError, match="must be 1 to"):  # every rank refuses it, and serves on
            parallel.prefill([1] * parallel.graphs.max_seq_len, 0)
        assert (parallel.prefill([4, 5], 0).logits - single.prefill([4, 5], 0).logits).abs().max() < 1e-4
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
