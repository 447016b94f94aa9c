"""A deterministic, randomly initialised tiny Llama written as a real Hugging Face directory.

Tests use it where the default model would be slow: same code paths, same file formats, a real
byte-level BPE tokenizer (trained on a fixed text, so it is the same every time) and a chat template.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from neuron_serve.model.config import ModelConfig
from neuron_serve.model.llama import LlamaModel
from neuron_serve.weights.local_cache import cache_dir

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
    "Tokens stream from the server one at a time; the engine batches requests into slots. "
    "Grüße aus Köln! 日本語のテキスト。 Emoji 🙂 and accents: café, naïve, façade. "
) * 20


def _train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TRAINING_TEXT], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def random_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LlamaModel(ModelConfig.from_hf(config), max_seq_len=8)
    for name, param in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.uniform_(0.8, 1.2)
            else:
                param.normal_(0.0, 0.08)
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        del state["lm_head.weight"]  # the same tensor as the embedding; safetensors stores it once
    return {f"model.{k}" if k != "lm_head.weight" else k: v.contiguous() for k, v in state.items()}


def write_tiny_model(directory: Path, seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors and the tokenizer into `directory`; returns it."""
    config = dict(TINY_CONFIG, **overrides)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(config["vocab_size"])
    config["vocab_size"] = max(config["vocab_size"], len(tokenizer))
    tokenizer.save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_state_dict(config, seed), directory / "model.safetensors")
    return directory


def tiny_model_dir(seed: int = 0) -> Path:
    """The tiny model in the cache directory, written on first use (deterministic, so reusable)."""
    directory = cache_dir() / "tiny-model" / f"seed{seed}"
    if not (directory / "model.safetensors").exists():
        # Written aside and renamed, so that processes starting together never see half a model.
        staging = write_tiny_model(directory.with_name(f"{directory.name}.{os.getpid()}.tmp"), seed)
        try:
            staging.rename(directory)
        except OSError:
            shutil.rmtree(staging)  # another process won the race; its copy is identical
    return directory
