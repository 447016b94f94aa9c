"""Our Llama-family model against Hugging Face transformers on the same weights, and slot batching."""

from __future__ import annotations

import pytest
import torch
from conftest import eager_runner
from hf_reference import hf_logits, hf_model

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
    rows = [runner.prefill(ids[:prompt_len], slot).logits]
    for position in range(prompt_len, len(ids)):
        tokens, positions = [0] * slots, [0] * slots
        tokens[slot], positions[slot] = ids[position], position
        rows.append(runner.decode(tokens, positions, active=1).logits[slot])
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
        runner.prefill(seq[:-1], slot)
    positions = [len(seq) - 1 for seq in sequences]
    batched = runner.decode([seq[-1] for seq in sequences], positions, active=len(sequences)).logits
    for slot, seq in enumerate(sequences):
        alone = prefill_then_decode(model, seq, len(seq) - 1, bucket=32, slot=0, slots=1)[-1]
        assert (batched[slot] - alone).abs().max() < 1e-5, f"slot {slot} differs when batched"


def test_chunked_prefill_matches_unchunked(tiny_loaded):
    """A prompt longer than the largest context bucket goes through it in chunks: same logits, and
    the cache it leaves gives the same next decode step."""
    model = build_model(tiny_loaded, 64)
    ids = [(i * 7) % 300 + 3 for i in range(45)]
    whole = eager_runner(model, 2, context_buckets=[64], token_buckets=[64])
    chunked = eager_runner(model, 2, context_buckets=[8, 16], token_buckets=[64])
    chunked_prefill = chunked.prefill(ids, slot=1)
    assert (chunked_prefill.logits - whole.prefill(ids, slot=1).logits).abs().max() < 1e-4
    uses = [(use.graph, use.real, use.padded) for use in chunked_prefill.uses]
    assert uses == [("prefill_16", 16, 16), ("prefill_chunk_16", 16, 16), ("prefill_chunk_16", 13, 16)]
    step = ([0, 17], [0, 45], 1)
    assert (chunked.decode(*step).logits[1] - whole.decode(*step).logits[1]).abs().max() < 1e-4
