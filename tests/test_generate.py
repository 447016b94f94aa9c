"""Generation on the default model, streaming detokenization, sampling, and the generate command."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import eager_runner

from neuron_serve.engine.detokenizer import IncrementalDetokenizer
from neuron_serve.engine.generate import generate
from neuron_serve.engine.prompts import encode_prompt, stop_ids
from neuron_serve.engine.sampler import SamplingParams, apply_penalties, new_generator, sample_row
from neuron_serve.weights.loader import build_model

MULTIBYTE = "Grüße aus Köln, 日本語のテキスト, emoji 🙂🚀, naïve café."


def test_default_model_knows_the_capital_of_france(default_loaded):
    model = build_model(default_loaded, 256)
    runner = eager_runner(model, 1, context_buckets=[64, 128], token_buckets=[128, 256])
    prompt = encode_prompt(default_loaded.tokenizer, "What is the capital of France?", chat=True)
    eos = stop_ids(default_loaded.tokenizer, default_loaded.config.eos_token_ids)
    text = "".join(
        generate(runner, default_loaded.tokenizer, prompt, SamplingParams(max_tokens=24, temperature=0), eos)
    )
    assert "Paris" in text


def test_streamed_pieces_are_whole_characters_and_add_up(default_loaded, tiny_loaded):
    for tokenizer in (default_loaded.tokenizer, tiny_loaded.tokenizer):
        ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
        detok = IncrementalDetokenizer(tokenizer)
        pieces = [detok.add(i) for i in ids] + [detok.flush()]
        assert all("\ufffd" not in piece for piece in pieces)
        assert "".join(pieces) == tokenizer.decode(ids) == MULTIBYTE
        assert sum(1 for p in pieces if p) > 5, "text must stream, not arrive at the end"


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = torch.randn(500)
    params = SamplingParams(temperature=1.0, seed=7)
    draw = lambda seed: [sample_row(logits, params, g) for g in [new_generator(seed)] for _ in range(20)]  # noqa: E731
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0, -2.0])
    generator = new_generator(0)
    top_k = {sample_row(logits, SamplingParams(temperature=1.0, top_k=2), generator) for _ in range(200)}
    assert top_k == {0, 1}
    probs = torch.softmax(logits, 0)  # p0≈0.66, p0+p1≈0.90
    assert probs[0] < 0.8 < probs[:2].sum()
    top_p = {sample_row(logits, SamplingParams(temperature=1.0, top_p=0.8), generator) for _ in range(200)}
    assert top_p == {0, 1}
    assert sample_row(logits, SamplingParams(temperature=0.0), generator) == 0


def test_penalties_push_down_repeated_tokens():
    logits = torch.tensor([2.0, 2.0, -1.0, 0.5])
    apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0], output_ids=[2])
    assert logits.tolist() == [1.0, 2.0, -2.0, 0.5]
    logits = torch.zeros(4)
    apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [1], [3, 3, 2])
    assert logits.tolist() == [0.0, 0.0, -0.75, -1.0]


def test_generate_command_streams_and_reports_speed(tiny_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "neuron_serve.cli",
            "generate",
            "--model",
            str(tiny_dir),
            "--prompt",
            "Paris is",
            "--max-tokens",
            "12",
            "--temperature",
            "0.8",
            "--seed",
            "3",
            "--max-seq-len",
            "128",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "12 generated" in result.stderr and "tokens/s" in result.stderr
    assert result.stdout.strip(), "the generated text goes to stdout"


def test_generate_command_rejects_bad_parameters_clearly(tiny_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "neuron_serve.cli",
            "generate",
            "--model",
            str(tiny_dir),
            "--prompt",
            "x",
            "--top-p",
            "1.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "top_p: must be in (0, 1], got 1.5" in result.stderr


def test_a_prompt_out_of_range_is_refused_with_the_limit(tiny_loaded):
    runner = eager_runner(build_model(tiny_loaded, 64), 1, context_buckets=[32], token_buckets=[64])
    for prompt in ([], [5] * 64):
        with pytest.raises(ValueError, match="must be 1 to 63 tokens"):
            next(generate(runner, tiny_loaded.tokenizer, prompt, SamplingParams(max_tokens=4), frozenset()))
