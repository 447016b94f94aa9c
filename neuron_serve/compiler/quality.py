"""What a quantization costs in quality, measured against the same model unquantized.

Two figures, on held-out public-domain text (the corpus that ``bench`` cuts its prompts from; nothing
is tuned on it):

- **perplexity** of the second half of the corpus, in windows of `window` tokens from position 0;
- **greedy agreement**: the unquantized model continues `prompts` slices of the first half greedily for
  `new_tokens` tokens; the share of those tokens that the quantized model, fed the same text, also
  ranks first. Teacher-forced, so one early difference does not count as every later one.

Both run the eager model on the CPU in the recipe's dtype, so they measure the quantization's error,
not a backend's. A weight-only method runs as the float model of its dequantized weights: its kernel
computes with exactly those (tests/test_quantization.py). int8-dynamic runs its own kernel, since it
also rounds the activations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources

import torch

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.backends.base import run_decode, run_prompt
from neuron_serve.backends.cpu.runners import EagerRunner
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.quantization import QuantSpec, dequantize_state_dict, quantize_state_dict
from neuron_serve.model.state import model_from_state_dict
from neuron_serve.weights.loaded import LoadedModel
from neuron_serve.weights.loader import build_model

PROMPT_TOKENS = 32


@dataclass
class Quality:
    method: str
    perplexity: float
    perplexity_increase: float  # relative to the unquantized model: 0.01 is 1 % higher
    greedy_agreement: float  # share of the unquantized model's greedy tokens also ranked first
    tokens: int  # tokens scored for the perplexity

    def to_dict(self) -> dict:
        return asdict(self)


def corpus_ids(loaded: LoadedModel) -> list[int]:
    # Data shared with `bench` (neuron_serve/bench/data/README.md), read as a file: no code of it.
    text = (resources.files("neuron_serve.bench") / "data" / "corpus.txt").read_text(encoding="utf-8")
    return loaded.tokenizer.encode(text, add_special_tokens=False)


def quantized_model(loaded: LoadedModel, spec: QuantSpec, max_seq_len: int) -> LlamaModel:
    """The model that measures `spec`: its kernel for int8-dynamic, else its dequantized weights."""
    if spec.method == "int8-dynamic":
        return build_model(loaded, max_seq_len, spec)
    state = quantize_state_dict(loaded.state_dict, spec, loaded.kept_quantization(spec))
    floats = dequantize_state_dict(state, spec, loaded.state_dict["embed_tokens.weight"].dtype)
    return model_from_state_dict(loaded.config, floats, max_seq_len)


@torch.inference_mode()
def perplexity(model: LlamaModel, ids: list[int], window: int) -> tuple[float, int]:
    """(perplexity, tokens scored) over consecutive windows of `ids`."""
    nll, scored = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        piece = torch.tensor([ids[start : start + window]])
        if piece.shape[1] < 2:
            break
        logits = model.prompt_logits(piece).float()
        nll += torch.nn.functional.cross_entropy(logits[:-1], piece[0, 1:], reduction="sum").item()
        scored += piece.shape[1] - 1
    return math.exp(nll / scored), scored


@torch.inference_mode()
def greedy_continuations(model: LlamaModel, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt continued greedily by `model`, all prompts decoding together."""
    length = max(map(len, prompts)) + new_tokens
    graphs = GraphSet(len(prompts), length, (max(map(len, prompts)),), (length,), token_budget=length + len(prompts))
    runner = EagerRunner(model, graphs)
    last = [int(run_prompt(runner, prompt, slot).argmax()) for slot, prompt in enumerate(prompts)]
    outputs = [[token] for token in last]
    slots = list(range(len(prompts)))
    for step in range(new_tokens - 1):
        positions = [len(prompt) + step for prompt in prompts]
        last = run_decode(runner, slots, last, positions).argmax(dim=-1).tolist()
        for output, token in zip(outputs, last, strict=True):
            output.append(token)
    return outputs


@torch.inference_mode()
def agreement(model: LlamaModel, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    same = total = 0
    for prompt, continuation in zip(prompts, continuations, strict=True):
        text = torch.tensor([prompt + continuation[:-1]])
        ranked_first = model.prompt_logits(text)[len(prompt) - 1 :].argmax(dim=-1)
        same += int((ranked_first == torch.tensor(continuation)).sum())
        total += len(continuation)
    return same / total


def evaluate(
    loaded: LoadedModel, methods: list[QuantSpec], prompts: int = 32, new_tokens: int = 64, window: int = 256
) -> list[Quality]:
    """The unquantized model first (method "none"), then each of `methods`."""
    ids = corpus_ids(loaded)
    half = len(ids) // 2
    step = max(1, (half - PROMPT_TOKENS) // prompts)
    prompt_ids = [ids[i : i + PROMPT_TOKENS] for i in range(0, step * prompts, step)][:prompts]
    max_seq_len = max(window, PROMPT_TOKENS + new_tokens)
    reference = build_model(loaded, max_seq_len)
    base, scored = perplexity(reference, ids[half:], window)
    continuations = greedy_continuations(reference, prompt_ids, new_tokens)
    results = [Quality("none", base, 0.0, 1.0, scored)]
    for spec in methods:
        model = quantized_model(loaded, spec, max_seq_len)
        value, _ = perplexity(model, ids[half:], window)
        results.append(
            Quality(spec.method, value, value / base - 1, agreement(model, prompt_ids, continuations), scored)
        )
    return results
