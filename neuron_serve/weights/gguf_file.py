"""Load a GGUF file with the `gguf` package: dequantize, map tensor names, undo the q/k permutation.

Every tensor is dequantized for the float state dict. Tensors stored as Q4_0 or Q4_1 also keep their
own 4-bit codes (`LoadedModel.int4_codes`), which ``int4-weight`` with group_size 32 uses as they are
(both are blocks of 32 weights with a scale, Q4_1 also an offset), so the served weights are exactly
the file's. Other types (Q8_0, Q5_x, the K-quants, F16) are dequantized, and a quantization method
quantizes the floats again: int8 is per output channel here and GGUF's Q8_0 per block of 32.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from transformers import AutoTokenizer

from neuron_serve.model.config import ModelConfig, UnsupportedModelError
from neuron_serve.model.quant_ops import pack_int4
from neuron_serve.weights.loaded import LoadedModel

# GGUF architecture -> (HF architecture, whether llama.cpp's converter permuted the q/k rows)
ARCHITECTURES = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}

LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: GGUFReader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    names = {t.name for t in reader.tensors}
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    freq_base = _field(reader, f"{arch}.rope.freq_base", 10000.0)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=ARCHITECTURES[arch][0],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_field(reader, f"{arch}.feed_forward_length"),
        num_hidden_layers=_field(reader, f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_field(reader, f"{arch}.attention.head_count_kv", heads),
        head_dim=_field(reader, f"{arch}.attention.key_length", hidden // heads),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(freq_base),
        rope_scaling=_rope_scaling(reader, arch),
        max_position_embeddings=_field(reader, f"{arch}.context_length", 2048),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
    )


def _rope_scaling(reader: GGUFReader, arch: str) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise UnsupportedModelError(f"GGUF rope scaling {kind!r} is not supported; supported: linear")
    return {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute`, which interleaves the two rotary halves
    of each head's rows (GGML's RoPE is interleaved, Hugging Face's is split into halves)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match and match.group(2) in LAYER_NAMES:
        return f"layers.{match.group(1)}.{LAYER_NAMES[match.group(2)]}"
    return None


def q4_blocks(data: np.ndarray, kind: GGMLQuantizationType, rows: int) -> dict[str, np.ndarray]:
    """A Q4_0/Q4_1 tensor's codes [rows, cols] (0..15), and per block of 32 its fp16 scale and offset
    [rows, cols/32], such that weight = code * scale + offset. Block layout (ggml-common.h): fp16 d,
    for Q4_1 fp16 m, then 16 bytes whose low nibbles are weights 0..15 and high nibbles 16..31;
    Q4_0's weight is (code - 8) * d, Q4_1's code * d + m."""
    header = 4 if kind == GGMLQuantizationType.Q4_1 else 2
    blocks = data.reshape(-1, header + 16)
    d = blocks[:, 0:2].copy().view(np.float16)[:, 0]
    m = blocks[:, 2:4].copy().view(np.float16)[:, 0] if header == 4 else -8 * d  # exact: a power of 2
    packed = blocks[:, header:]
    codes = np.concatenate([packed & 15, packed >> 4], axis=1)
    return {"codes": codes.reshape(rows, -1), "scale": d.reshape(rows, -1), "zero": m.reshape(rows, -1)}


def _unpermute(name: str, array: np.ndarray, config: ModelConfig, permuted: bool) -> np.ndarray:
    if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
        return unpermute_rows(array, config.num_attention_heads)
    if permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
        return unpermute_rows(array, config.num_key_value_heads)
    return array


def load_gguf(path: Path) -> LoadedModel:
    reader = GGUFReader(path)
    config = config_from_gguf(reader)
    permuted = ARCHITECTURES[_field(reader, "general.architecture")][1]
    state_dict, int4_codes = {}, {}
    for tensor in reader.tensors:
        name = _tensor_name(tensor.name)
        if name is None:
            continue  # e.g. rope_freqs: recomputed from the config
        shape = [int(d) for d in reversed(tensor.shape)]  # GGUF lists dims innermost first
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        state_dict[name] = torch.from_numpy(np.ascontiguousarray(_unpermute(name, array, config, permuted)))
        if tensor.tensor_type in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
            parts = {
                k: _unpermute(name, v, config, permuted)
                for k, v in q4_blocks(tensor.data, tensor.tensor_type, shape[0]).items()
            }
            int4_codes[name.removesuffix(".weight")] = {
                "weight": pack_int4(torch.from_numpy(np.ascontiguousarray(parts["codes"]))),
                "scale": torch.from_numpy(np.ascontiguousarray(parts["scale"])),
                "zero": torch.from_numpy(np.ascontiguousarray(parts["zero"])),
            }
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return LoadedModel(config, state_dict, tokenizer, path, int4_codes)
