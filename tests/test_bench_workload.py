"""Benchmark workloads: preset lengths, prompts of exact token length, JSONL input, arrival times."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from neuron_serve.bench.runner import LoadLevel, arrival_offsets
from neuron_serve.bench.tokenizer import BenchError, HFTokenizer
from neuron_serve.bench.workload import (
    WorkloadSpec,
    corpus_token_ids,
    load_corpus,
    load_jsonl,
    sample_lengths,
    synthetic_requests,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> HFTokenizer:
    """A small byte-level BPE trained on the corpus, with a BOS token and a chat template: the same kind
    of tokenizer directory as ARTIFACTS/tokenizer, made in about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([load_corpus()], trainer)
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return HFTokenizer(path)


def served_length(tok: HFTokenizer, endpoint: str, prompt: str) -> int:
    """The prompt length a server counts: with special tokens, or the rendered chat template."""
    hf = tok._tok
    if endpoint == "completions":
        return len(hf.encode(prompt, add_special_tokens=True))
    text = hf.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return len(hf.encode(text, add_special_tokens=False))


def test_preset_lengths_and_ratios():
    assert WorkloadSpec("qa").lengths() == (256, 128)
    assert WorkloadSpec("summarization").lengths() == (1024, 128)
    assert WorkloadSpec("generation").lengths() == (256, 256)
    assert WorkloadSpec("summarization", input_len=800).lengths() == (800, 100)  # ratio 8:1 kept
    assert WorkloadSpec("qa", output_len=64).lengths() == (128, 64)
    assert WorkloadSpec("qa", input_len=16, output_len=8).lengths() == (16, 8)


def test_sampled_lengths_stay_in_the_range():
    rng = np.random.default_rng(0)
    assert sample_lengths(100, 0.0, 5, rng) == [100] * 5
    spread = sample_lengths(100, 0.25, 2000, rng)
    assert min(spread) >= 75 and max(spread) <= 125 and len(set(spread)) > 40
    assert min(sample_lengths(1, 0.9, 50, rng)) >= 1


def test_corpus_is_real_text_of_tens_of_kilobytes():
    text = load_corpus()
    assert len(text) > 20_000 and "Call me Ishmael." in text


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_synthetic_prompts_have_exact_token_lengths(tokenizer, endpoint):
    overhead = tokenizer.prompt_overhead(endpoint)
    ids = corpus_token_ids(tokenizer, load_corpus())
    spec = WorkloadSpec("qa", input_len=40, output_len=8, range_ratio=0.5, num_prompts=30)
    reqs = synthetic_requests(spec, tokenizer, ids, overhead, seed=[0, 1])
    assert len(reqs) == 30
    for req in reqs:
        assert served_length(tokenizer, endpoint, req.prompt) == req.prompt_len
        assert 20 <= req.prompt_len <= 60 and 4 <= req.max_tokens <= 12
    # Longer than the whole corpus: it is repeated.
    (long,) = synthetic_requests(WorkloadSpec(input_len=len(ids) + 500, num_prompts=1), tokenizer, ids, 0, 3)
    assert long.prompt_len == len(ids) + 500


def test_levels_get_different_prompts_and_seeds_repeat(tokenizer):
    ids = corpus_token_ids(tokenizer, load_corpus())
    spec = WorkloadSpec(input_len=32, output_len=8, num_prompts=5)
    first = [r.prompt for r in synthetic_requests(spec, tokenizer, ids, 1, seed=[0, 0])]
    again = [r.prompt for r in synthetic_requests(spec, tokenizer, ids, 1, seed=[0, 0])]
    other_level = [r.prompt for r in synthetic_requests(spec, tokenizer, ids, 1, seed=[0, 1])]
    assert first == again and first != other_level


def test_jsonl_dataset(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Hello there."}, {"prompt": "Tell me more.", "output_len": 5}, {"prompt": "x", "max_tokens": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    reqs = load_jsonl(path, default_output_len=8, limit=100, tok=tokenizer, overhead=1)
    assert [r.max_tokens for r in reqs] == [8, 5, 3]
    assert reqs[0].prompt_len == len(tokenizer.encode("Hello there.")) + 1
    assert [r.prompt_len for r in load_jsonl(path, 8, limit=2, tok=None, overhead=0)] == [None, None]
    path.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(BenchError, match="prompts.jsonl:1"):
        load_jsonl(path, 8, 10, None, 0)


def test_arrival_times():
    rng = np.random.default_rng(0)
    assert arrival_offsets(4, LoadLevel(8), rng) == [0.0] * 4
    steady = arrival_offsets(5, LoadLevel(None, 4.0, burstiness=math.inf), rng)
    assert steady == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    poisson = np.diff(arrival_offsets(20001, LoadLevel(None, 10.0), rng))
    assert poisson.mean() == pytest.approx(0.1, rel=0.03)
    assert poisson.std() == pytest.approx(0.1, rel=0.05)  # exponential gaps: std equals mean
    bursty = np.diff(arrival_offsets(20001, LoadLevel(None, 10.0, burstiness=0.25), rng))
    assert bursty.mean() == pytest.approx(0.1, rel=0.05) and bursty.std() > 1.8 * 0.1


def test_level_keys_and_labels():
    assert (LoadLevel(8).key, LoadLevel(8).label) == ("c8", "concurrency 8")
    open_loop = LoadLevel(16, 2.5)
    assert (open_loop.key, open_loop.label, open_loop.closed_loop) == ("r2.5", "2.5 req/s, max concurrency 16", False)
