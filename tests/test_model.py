"""Our Llama-family model against Hugging Face transformers on the same weights, and slot batching."""

from __future__ import annotations

import pytest
import torch
from conftest import eager_runner
from hf_reference import hf_logits, hf_model

from neuron_serve.backends.base import run_decode, run_prompt
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.step import PromptChunk, StepBatch
from neuron_serve.weights.loader import build_model, load_model_files
from neuron_serve.weights.tiny import write_tiny_model

TOLERANCE = 1e-3  # fp32; observed differences are ~1e-6 (summation order inside matmuls)

VARIANTS = {
    "llama": {},
    "llama3-rope-scaling-tied": {
        "tie_word_embeddings": True,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_key_value_heads": 1},
    "qwen2-bias": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_key_value_heads": 4},
}


def prefill_then_decode(model, ids: list[int], prompt_len: int, bucket: int, slot: int, slots: int = 3):
    """Our logits for positions prompt_len-1 .. len(ids)-1: one prefill, then decode steps."""
    runner = eager_runner(model, slots, context_buckets=[bucket], token_buckets=[model.max_seq_len])
    rows = [run_prompt(runner, ids[:prompt_len], slot)]
    for position in range(prompt_len, len(ids)):
        rows.append(run_decode(runner, [slot], [ids[position]], [position])[0])
    return torch.stack(rows)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_variants_match_transformers(variant, tmp_path):
    loaded = load_model_files(str(write_tiny_model(tmp_path / variant, seed=3, **VARIANTS[variant])))
    reference = hf_logits(hf_model(loaded.config, loaded.state_dict), list(range(3, 43)))
    ours = prefill_then_decode(build_model(loaded, 64), list(range(3, 43)), prompt_len=30, bucket=32, slot=1)
    assert (ours - reference[29:]).abs().max() < TOLERANCE


def test_default_model_matches_transformers(default_loaded):
    ids = default_loaded.tokenizer.encode("The history of the Roman Empire begins with", add_special_tokens=False)
    ids = ids + [279, 1345, 282, 260]  # a few decode steps through the KV cache
    reference = hf_logits(hf_model(default_loaded.config, default_loaded.state_dict), ids)
    prompt_len = len(ids) - 4
    ours = prefill_then_decode(build_model(default_loaded, 128), ids, prompt_len, bucket=16, slot=0, slots=2)
    assert (ours - reference[prompt_len - 1 :]).abs().max() < TOLERANCE


def test_decode_slots_at_different_positions_match_each_alone(tiny_loaded):
    """Each slot's logits in a mixed batch equal those of its sequence run alone."""
    model = build_model(tiny_loaded, 64)
    sequences = [list(range(5, 5 + n)) for n in (7, 19, 3, 12)]
    runner = eager_runner(model, len(sequences), context_buckets=[32], token_buckets=[32, 64])
    for slot, seq in enumerate(sequences):
        run_prompt(runner, seq[:-1], slot)
    slots = list(range(len(sequences)))
    batched = run_decode(runner, slots, [seq[-1] for seq in sequences], [len(seq) - 1 for seq in sequences])
    for slot, seq in enumerate(sequences):
        alone = prefill_then_decode(model, seq, len(seq) - 1, bucket=32, slot=0, slots=1)[-1]
        assert (batched[slot] - alone).abs().max() < 1e-5, f"slot {slot} differs when batched"


def test_batch_bucketed_decode_matches_full_batch_decode(tiny_loaded):
    """Three streams in slots 0, 1 and 4 of 8: the step runs 8 rows with batch buckets (1, 2, 8) and with
    (8,) alike, and 2 rows once the stream in slot 4 is gone. Same logits either way."""
    model = build_model(tiny_loaded, 64)
    bucketed = eager_runner(model, 8, context_buckets=[32], token_buckets=[64], batch_buckets=[1, 2, 8])
    full = eager_runner(model, 8, context_buckets=[32], token_buckets=[64], batch_buckets=[8])
    sequences = {0: list(range(5, 14)), 1: list(range(20, 24)), 4: list(range(40, 57))}
    for runner in (bucketed, full):
        for slot, seq in sequences.items():
            run_prompt(runner, seq[:-1], slot)
    for slots in ([0, 1, 4], [0, 1]):
        tokens, positions = [sequences[s][-1] for s in slots], [len(sequences[s]) - 1 for s in slots]
        ours = bucketed.step(StepBatch(slots, tokens, positions))
        theirs = full.step(StepBatch(slots, tokens, positions))
        assert (ours.logits - theirs.logits).abs().max() < 1e-5
        assert ours.uses[0].padded == (8 if 4 in slots else 2) and theirs.uses[0].padded == 8


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_decode_reading_its_own_positions_matches_the_masked_kv_bucket(tiny_loaded, tmp_path, kv_heads):
    """The CPU's decode attention operator (each slot reads its cached positions 0..p-1) against the
    torch ops every other device traces (the whole KV bucket, masked): the same logits for slots at
    position 0, inside the smallest bucket and past it, beside a continued prompt and alone."""
    loaded = load_model_files(str(write_tiny_model(tmp_path / "tiny", num_key_value_heads=kv_heads)))
    exact = build_model(loaded, 128)
    masked = LlamaModel(loaded.config, 128, kernel_device="neuron")  # no kernels: nki is not imported
    masked.load_state_dict(exact.state_dict())
    assert exact.exact_decode_keys and not masked.exact_decode_keys
    runners = [eager_runner(m, 4, context_buckets=[16, 32], token_buckets=[32, 128]) for m in (exact, masked)]
    prompts = {0: list(range(3, 40)), 1: [7, 8, 9], 2: list(range(50, 110)), 3: [4]}
    for runner in runners:
        for slot, prompt in list(prompts.items())[:3]:
            run_prompt(runner, prompt, slot)
    steps = [
        StepBatch([0, 1, 2], [5, 6, 7], [37, 3, 60]),
        StepBatch([0, 2], [8, 9], [38, 61], [PromptChunk(3, 0, prompts[3])]),
        StepBatch([1, 3], [10, 11], [4, 1], [PromptChunk(0, 39, list(range(30)))]),
    ]
    for step in steps:
        ours, theirs = (runner.step(step).logits for runner in runners)
        assert (ours - theirs).abs().max() < 1e-5, step


def test_chunked_prefill_matches_unchunked(tiny_loaded):
    """A prompt longer than the step's prompt budget goes through it in chunks: same logits, and
    the cache it leaves gives the same next decode step."""
    model = build_model(tiny_loaded, 64)
    ids = [(i * 7) % 300 + 3 for i in range(45)]
    whole = eager_runner(model, 2, context_buckets=[64], token_buckets=[64])
    chunked = eager_runner(model, 2, context_buckets=[8, 16], token_buckets=[64])
    assert (run_prompt(chunked, ids, slot=1) - run_prompt(whole, ids, slot=1)).abs().max() < 1e-4
    step = ([1], [17], [45])
    assert (run_decode(chunked, *step) - run_decode(whole, *step)).abs().max() < 1e-4


def test_bf16_logits_stay_within_the_stated_tolerance_of_fp32(tiny_loaded):
    """What `model.dtype = "auto"` gives a CPU with bf16 instructions: bf16 weights, activations and KV
    cache. Tolerance: 0.05 absolute on the tiny model's logits (|logits| ~ 2; bf16 keeps 8 bits of
    mantissa, so each of the two layers' matmuls is off by ~0.4%)."""
    ids = list(range(3, 40))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(tiny_loaded, 64).to(dtype)
        runner = eager_runner(model, 2, context_buckets=[16], token_buckets=[64])
        logits[dtype] = torch.stack([run_prompt(runner, ids, 1), run_decode(runner, [1], [5], [len(ids)])[0]])
    assert logits[torch.bfloat16].dtype == torch.bfloat16
    assert (logits[torch.bfloat16].float() - logits[torch.float32]).abs().max() < 0.05
