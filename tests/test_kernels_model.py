"""The served model with the fused kernels of nki_kernels enabled, against the kernel-free model.

Tolerance: 1e-4 absolute on the logits (|logits| ~ 2 for the tiny model), fp32 throughout. With
the kernels on, the model computes the same fp32 math from the same weights in a different order:
blocked matmuls (swiglu_mlp's 512-unit blocks), online-softmax merges (prefill_attention,
decode_attention and the merge of the step's own key), fp32 RoPE, the norm's weight applied before
its cast. Observed differences are ~1e-6 (a few ulps of the logits after two layers). A masking,
indexing, GQA-grouping or merge error moves logits by O(0.1..1), far above 1e-4; the AOT graph
reorders sums once more (Inductor fusions), within the same bound.
"""

from __future__ import annotations

import pytest
import torch
from conftest import eager_runner, tiny_recipe, wait_finished

import nki_kernels
from neuron_serve.backends.base import run_decode, run_prompt
from neuron_serve.backends.cpu.compile import tracing_model
from neuron_serve.backends.cpu.export import compile_step_graph, constants_map
from neuron_serve.backends.registry import open_runner
from neuron_serve.compiler.compile import compile_recipe
from neuron_serve.engine import sampler as sampler_module
from neuron_serve.engine.engine import Engine
from neuron_serve.engine.metrics import metrics_for
from neuron_serve.engine.prompts import encode_prompt
from neuron_serve.engine.sampler import SamplingParams, fused_is_exact
from neuron_serve.engine.sequence import Sequence
from neuron_serve.model.state import model_from_state_dict
from neuron_serve.model.step import PromptChunk, StepBatch, step_tensors
from neuron_serve.weights.loader import load_model_files
from neuron_serve.weights.tiny import write_tiny_model
from nki_kernels import reference
from nki_kernels.testing import assert_close, randn

ALL = frozenset(nki_kernels.KERNELS)
TOLERANCE = 1e-4
# Long enough for a 600-token prompt (5 prefill_attention query blocks) and decode over two
# 512-key flash-decoding blocks.
MAX_SEQ_LEN = 768


def assert_near(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = (actual - expected).abs().max().item()
    assert error < TOLERANCE, f"{what}: max |difference| {error:.2e}"


@pytest.fixture(scope="module", params=[1, 2], ids=["gqa1", "gqa2"])
def loaded(request, tmp_path_factory):
    """The tiny model (4 query heads) with 4 or 2 KV heads."""
    directory = tmp_path_factory.mktemp("tiny") / f"gqa{request.param}"
    overrides = {"num_key_value_heads": 4 // request.param, "max_position_embeddings": MAX_SEQ_LEN}
    return load_model_files(str(write_tiny_model(directory, seed=5, **overrides)))


def runners(loaded, batch: int, context_buckets: list[int], token_buckets: list[int]):
    """Kernel-free and all-kernel runners of the same weights."""
    pair = []
    for kernels in (frozenset(), ALL):
        model = model_from_state_dict(loaded.config, loaded.state_dict, MAX_SEQ_LEN, kernels=kernels)
        pair.append(eager_runner(model, batch, context_buckets, token_buckets))
    return pair


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def decode_in_step(plain, fused, slots: list[int], tokens: list[int], positions: list[int], steps: int):
    """`steps` decode steps of `slots` on both runners with the same tokens; logits and caches agree.
    Slots below the highest that are not listed run as idle rows (position 0: no cached keys)."""
    for step in range(steps):
        expected = run_decode(plain, slots, tokens, positions)
        assert_near(run_decode(fused, slots, tokens, positions), expected, f"decode step {step}")
        positions = [p + 1 for p in positions]
    assert_near(fused.cache.keys, plain.cache.keys, "keys stored by decode")
    assert_near(fused.cache.values, plain.cache.values, "values stored by decode")


def test_prefill_then_decode(loaded):
    plain, fused = runners(loaded, 4, context_buckets=[16, 160], token_buckets=[64, MAX_SEQ_LEN])
    # Slot 0 stays idle; a full bucket, a padded one, a prompt in four steps whose decode spans two
    # 512-key blocks.
    for slot, length in ((1, 16), (2, 100), (3, 600)):
        ids = prompt(length, seed=slot)
        assert_near(run_prompt(fused, ids, slot), run_prompt(plain, ids, slot), f"prefill of {length} tokens")
    assert_near(fused.cache.keys, plain.cache.keys, "keys stored by prefill")
    assert_near(fused.cache.values, plain.cache.values, "values stored by prefill")
    decode_in_step(plain, fused, [1, 2, 3], [6, 7, 8], [16, 100, 600], steps=3)


def test_the_prefill_graph_of_the_neuron_family_with_prefill_attention(loaded):
    """`LlamaModel.prefill` (a prompt from position 0, as the neuron backend compiles it) with the
    prefill_attention kernel: 600 tokens are 5 of its query blocks."""
    plain, fused = runners(loaded, 1, context_buckets=[16], token_buckets=[MAX_SEQ_LEN])
    tokens = torch.tensor([prompt(600, seed=3)])
    with torch.inference_mode():
        expected, got = (
            plain.model.prefill(tokens, torch.tensor([599])),
            fused.model.prefill(tokens, torch.tensor([599])),
        )
    for name, a, b in zip(("logits", "keys", "values"), got, expected, strict=True):
        assert_near(a, b, name)


def test_chunked_prefill_then_decode(loaded):
    """A continued prompt attends its cache row with SDPA; the norm, qkv and MLP kernels still run."""
    plain, fused = runners(loaded, 2, context_buckets=[8, 16], token_buckets=[64])
    ids = prompt(45, seed=7)
    assert_near(run_prompt(fused, ids, 1), run_prompt(plain, ids, 1), "chunked prefill")
    decode_in_step(plain, fused, [1], [10], [45], steps=3)


def test_step_graph_with_kernels_matches_eager_model(loaded, tmp_path):
    """The step graph traced with every kernel, through torch.export + AOTInductor."""
    plain, fused = runners(loaded, 3, context_buckets=[32], token_buckets=[64])
    package = torch._inductor.aoti_load_package(str(compile_step_graph(fused.model, fused.graphs, tmp_path / "s.pt2")))
    state = dict(fused.model.named_parameters(remove_duplicate=False)) | dict(fused.model.named_buffers())
    package.load_constants(constants_map(package, state), check_full_update=True, user_managed=True)
    for slot, length in ((1, 30), (2, 9)):
        run_prompt(plain, prompt(length, seed=slot), slot)
    batch = StepBatch([1, 2], [4, 5], [30, 9], [PromptChunk(0, 0, prompt(6, seed=9))])
    shape, _ = plain.graphs.step_shape(batch)
    inputs = (*step_tensors(batch, shape), plain.cache.keys, plain.cache.values)
    with torch.inference_mode():
        expected = plain.model.step(*inputs)
    for name, a, b in zip(("logits", "keys", "values"), package(*inputs), expected, strict=True):
        assert_near(a, b, f"graph {name}")


@pytest.mark.parametrize("block", [16, 512])
def test_decode_attention_lse_matches_reference(block):
    g = torch.Generator().manual_seed(block)
    q = randn(4, 6, 16, generator=g)
    k_cache, v_cache = randn(4, 2, 40, 16, generator=g), randn(4, 2, 40, 16, generator=g)
    lengths = torch.tensor([0, 1, 17, 40])
    out, lse = nki_kernels.decode_attention(q, k_cache, v_cache, lengths, 0.25, block_size=block, return_lse=True)
    expected_out, expected_lse = reference.decode_attention(q, k_cache, v_cache, lengths, 0.25, return_lse=True)
    assert torch.equal(out, nki_kernels.decode_attention(q, k_cache, v_cache, lengths, 0.25, block_size=block))
    assert_close(out, expected_out)
    assert torch.equal(lse[0], torch.full((6,), float("-inf"))), "an empty slot's lse is -inf"
    assert_close(lse[1:], expected_lse[1:])


def test_recipe_kernels_reach_the_traced_and_the_eager_model(tmp_path):
    recipe = tiny_recipe(**{"kernels.enabled": list(nki_kernels.KERNELS), "compiler.cpu_mode": "eager"})
    artifacts = compile_recipe(recipe, tmp_path / "tiny-eager").out_dir
    runner, manifest = open_runner(artifacts)
    assert runner.model.kernels == ALL
    assert tracing_model(recipe, manifest.model_config, artifacts / manifest.weights[0]).kernels == ALL
    with pytest.raises(ValueError, match="unknown kernels"):
        model_from_state_dict(manifest.model_config, {}, 8, kernels=frozenset({"flash"}))


def run_engine(loaded, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    """All requests admitted together into one engine with the sampling kernel; their output ids."""
    model = model_from_state_dict(loaded.config, loaded.state_dict, 128)
    runner = eager_runner(model, len(requests), context_buckets=[16], token_buckets=[64, 128])
    engine = Engine(runner, metrics_for("kernels-test"), max_waiting=8, kernels=frozenset({"sampling"}))
    seqs = [Sequence(ids, params, loaded.tokenizer, frozenset()) for ids, params in requests]
    for seq in seqs:
        engine.submit(seq)  # before start: the first step admits them all
    engine.start()
    try:
        wait_finished(seqs)
    finally:
        engine.stop()
    return [seq.output_ids for seq in seqs]


def test_engine_fused_sampling_is_reproducible_under_batching(loaded, monkeypatch):
    calls = []
    sample = nki_kernels.sample

    def spy(logits, *args):
        calls.append(logits.shape[0])
        return sample(logits, *args)

    monkeypatch.setattr(sampler_module.nki_kernels, "sample", spy)
    ids = prompt(10, seed=1)
    seeded = (ids, SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=11, ignore_eos=True))
    alone = run_engine(loaded, [seeded])[0]
    others = [
        (prompt(5, seed=2), SamplingParams(max_tokens=12, temperature=1.2, top_k=40, seed=3, ignore_eos=True)),
        (ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
        (ids, SamplingParams(max_tokens=12, temperature=1.0, top_k=1, ignore_eos=True)),  # greedy by top-k
    ]
    batched = run_engine(loaded, [seeded, *others])
    assert batched[0] == alone, "a seeded request must sample the same tokens alone and batched"
    assert batched[2] == batched[3], "top_k = 1 is greedy"
    assert max(calls) == 3, "the kernel samples the non-greedy rows of a decode step together"
    assert len(alone) == 12


@pytest.mark.slow
def test_default_model_greedy_chat_answer_is_the_same_with_kernels(default_loaded):
    ids = encode_prompt(default_loaded.tokenizer, "What is the capital of France?", chat=True)
    answers = []
    for kernels in (frozenset(), ALL):
        model = model_from_state_dict(default_loaded.config, default_loaded.state_dict, 256, kernels=kernels)
        runner = eager_runner(model, 1, context_buckets=[64], token_buckets=[256])
        out = [int(run_prompt(runner, ids, 0).argmax())]
        for _ in range(23):
            out.append(int(run_decode(runner, [0], [out[-1]], [len(ids) + len(out) - 1])[0].argmax()))
        answers.append(out)
    assert answers[0] == answers[1], [default_loaded.tokenizer.decode(a) for a in answers]
    assert "Paris" in default_loaded.tokenizer.decode(answers[1])


def test_requests_the_fused_sampler_cannot_honour_exactly_are_sampled_per_row():
    def params(**changes):
        return SamplingParams(temperature=1.0, **changes)

    assert fused_is_exact(params(top_k=50, top_p=0.9)) and fused_is_exact(params())
    assert not fused_is_exact(params(top_p=0.9)), "a nucleus over the whole vocabulary may exceed the candidate cap"
    assert not fused_is_exact(params(top_k=1000))
