"""Write a Hugging Face model directory as a GGUF file the way llama.cpp's converter does
(q/k rows permuted for GGML's interleaved RoPE, tokenizer and chat template in the metadata)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from safetensors.numpy import load_file

NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def export_gguf(model_dir: Path, out: Path, quantization: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    writer = GGUFWriter(out, "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    _add_tokenizer(writer, model_dir)
    for name, array in sorted(load_file(model_dir / "model.safetensors").items()):
        name = name.removeprefix("model.")
        if name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            if rest == "self_attn.q_proj.weight":
                array = permute(array, config["num_attention_heads"])
            elif rest == "self_attn.k_proj.weight":
                array = permute(array, config["num_key_value_heads"])
            gguf_name = f"blk.{index}.{NAMES[rest]}"
        else:
            gguf_name = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}.get(
                name, "output.weight"
            )
        is_matrix = array.ndim == 2 and quantization != GGMLQuantizationType.F32
        if is_matrix:
            from gguf.quants import quantize

            writer.add_tensor(gguf_name, quantize(array, quantization), raw_dtype=quantization)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer: GGUFWriter, model_dir: Path) -> None:
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tokenizer["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = tokenizer_config.get("chat_template") or (model_dir / "chat_template.jinja").read_text()
    writer.add_chat_template(template)
