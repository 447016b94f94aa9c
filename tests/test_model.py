"""Our Llama-family model against Hugging Face transformers on the same weights, and slot batching."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_logits, hf_model

from neuron_serve.tiny import write_tiny_model
from neuron_serve.weights import build_model, load_model_files

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
    k_cache, v_cache = model.new_kv_cache(slots)
    tokens = torch.zeros(1, bucket, dtype=torch.long)
    tokens[0, :prompt_len] = torch.tensor(ids[:prompt_len])
    with torch.no_grad():
        rows = [
            model.prefill(tokens, torch.tensor([slot]), torch.tensor([prompt_len - 1]), k_cache, v_cache)[0]
        ]
        for position in range(prompt_len, len(ids)):
            step_tokens = torch.zeros(slots, dtype=torch.long)
            step_positions = torch.zeros(slots, dtype=torch.long)
            step_tokens[slot], step_positions[slot] = ids[position], position
            rows.append(model.decode(step_tokens, step_positions, k_cache, v_cache, model.max_seq_len)[slot])
    return torch.stack(rows)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_variants_match_transformers(variant, tmp_path):
    loaded = load_model_files(str(write_tiny_model(tmp_path / variant, seed=3, **VARIANTS[variant])))
    reference = hf_logits(hf_model(loaded.config, loaded.state_dict), list(range(3, 43)))
    ours = prefill_then_decode(build_model(loaded, 64), list(range(3, 43)), prompt_len=30, bucket=32, slot=1)
    assert (ours - reference[29:]).abs().max() < TOLERANCE


def test_default_model_matches_transformers(default_loaded):
    ids = default_loaded.tokenizer.encode(
        "The history of the Roman Empire begins with", add_special_tokens=False
    )
    ids = ids + [279, 1345, 282, 260]  # a few decode steps through the KV cache
    reference = hf_logits(hf_model(default_loaded.config, default_loaded.state_dict), ids)
    prompt_len = len(ids) - 4
    ours = prefill_then_decode(build_model(default_loaded, 128), ids, prompt_len, bucket=16, slot=0, slots=2)
    assert (ours - reference[prompt_len - 1 :]).abs().max() < TOLERANCE


def test_decode_slots_at_different_positions_match_each_alone(tiny_loaded):
    """Each slot's logits in a mixed batch equal those of its sequence run alone."""
    model = build_model(tiny_loaded, 64)
    sequences = [list(range(5, 5 + n)) for n in (7, 19, 3, 12)]
    k_cache, v_cache = model.new_kv_cache(len(sequences))
    with torch.no_grad():
        for slot, seq in enumerate(sequences):
            tokens = torch.zeros(1, 32, dtype=torch.long)
            tokens[0, : len(seq) - 1] = torch.tensor(seq[:-1])
            model.prefill(tokens, torch.tensor([slot]), torch.tensor([len(seq) - 2]), k_cache, v_cache)
        last_tokens = torch.tensor([seq[-1] for seq in sequences])
        positions = torch.tensor([len(seq) - 1 for seq in sequences])
        batched = model.decode(last_tokens, positions, k_cache, v_cache, 32)
    for slot, seq in enumerate(sequences):
        alone = prefill_then_decode(model, seq, len(seq) - 1, bucket=32, slot=0, slots=1)[-1]
        assert (batched[slot] - alone).abs().max() < 1e-5, f"slot {slot} differs when batched"


def test_chunked_prefill_matches_unchunked(tiny_loaded):
    model = build_model(tiny_loaded, 64)
    ids = [(i * 7) % 300 + 3 for i in range(45)]
    whole = prefill_then_decode(model, ids, prompt_len=45, bucket=64, slot=0)[0]
    k_cache, v_cache = model.new_kv_cache(2)
    with torch.no_grad():
        first = torch.tensor([ids[:16]])
        model.prefill(first, torch.tensor([1]), torch.tensor([15]), k_cache, v_cache)
        for start in (16, 32):
            chunk = torch.zeros(1, 16, dtype=torch.long)
            part = ids[start : start + 16]
            chunk[0, : len(part)] = torch.tensor(part)
            logits = model.prefill_chunk(
                chunk,
                torch.tensor([1]),
                torch.tensor([start]),
                torch.tensor([len(part) - 1]),
                k_cache,
                v_cache,
            )
    assert (logits[0] - whole).abs().max() < 1e-4
