"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) with static shapes and a static KV cache.

One implementation serves every backend. Every forward takes the KV cache as an argument of shape
``[layers, slots, kv_heads, max_seq_len, head_dim]`` and writes into it in place, so that a traced graph
per bucket can share one cache and one copy of the weights. q/k/v/o and gate/up/down stay separate
linear layers: the tensor-parallel split shards them column- or row-wise (see ``sharding.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuron_serve.config import ModelConfig
from neuron_serve.parallel import TensorParallel
from neuron_serve.rope import apply_rope, rope_tables


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        hd = config.head_dim
        self.head_dim = hd
        self.n_heads = config.num_attention_heads // tp.degree
        self.n_kv_heads = tp.local_kv_heads(config.num_key_value_heads)
        self.tp = tp
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, config.hidden_size, bias=config.o_bias and tp.rank == 0)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, H] -> q [B, T, heads, hd], k and v [B, T, kv_heads, hd], RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        """q [B, T, heads, hd]; keys/values [B, kv_heads, Lk, hd]; mask [B, T, Lk] (True = visible).

        The query heads that share a KV head are folded into the query length, so GQA never copies
        the cache (repeat_interleave would read it `group` times).
        """
        b, t, _, hd = q.shape
        group = self.n_heads // self.n_kv_heads
        q = (
            q.view(b, t, self.n_kv_heads, group, hd)
            .permute(0, 2, 3, 1, 4)
            .reshape(b, self.n_kv_heads, group * t, hd)
        )
        mask = (
            mask.unsqueeze(1).unsqueeze(1).expand(b, 1, group, t, mask.shape[-1]).reshape(b, 1, group * t, -1)
        )
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.view(b, self.n_kv_heads, group, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, -1)
        return self.tp.all_reduce(self.o_proj(out))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        inter = config.intermediate_size // tp.degree
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)


class LlamaModel(nn.Module):
    """Parameter names follow Hugging Face's ``LlamaForCausalLM`` without the ``model.`` prefix."""

    def __init__(self, config: ModelConfig, max_seq_len: int, tp: TensorParallel | None = None):
        super().__init__()
        self.config = config
        self.max_seq_len = max_seq_len
        self.tp = tp or TensorParallel()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, self.tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Embeddings and lm_head are replicated on every rank: sampling then needs no all-gather of
        # the logits, and for the models served here their size is small next to the layers.
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config, max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def new_kv_cache(self, slots: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.layers[0].self_attn
        shape = (len(self.layers), slots, attn.n_kv_heads, self.max_seq_len, self.config.head_dim)
        dtype = dtype or self.embed_tokens.weight.dtype
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)

    def _run_layers(self, x, positions, write, read, mask):
        """Shared body: `write(layer, k, v)` stores new keys/values, `read(layer, k, v)` returns what
        attention sees (the cache, or the fresh keys for a prefill from position 0)."""
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
            write(i, k, v)
            keys, values = read(i, k, v)
            x = x + attn.attend(q, keys, values, mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def prefill(self, tokens, slot, last_index, k_cache, v_cache) -> torch.Tensor:
        """A prompt from position 0. tokens [1, T] (padded at the end), slot [1], last_index [1]:
        the position of the last real token. Returns its logits [1, vocab]."""
        t = tokens.shape[1]
        positions = torch.arange(t, device=tokens.device).unsqueeze(0)

        def write(i, k, v):
            k_cache[i, slot, :, :t] = k.transpose(1, 2)
            v_cache[i, slot, :, :t] = v.transpose(1, 2)

        def read(i, k, v):
            return k.transpose(1, 2), v.transpose(1, 2)

        mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril().unsqueeze(0)
        hidden = self._run_layers(self.embed_tokens(tokens), positions, write, read, mask)
        return self.lm_head(hidden[:, last_index[0]])

    def prefill_chunk(self, tokens, slot, start, last_index, k_cache, v_cache) -> torch.Tensor:
        """A chunk of a long prompt at positions start..start+T-1 of a slot that already holds
        `start` tokens; it attends over the whole cache row, masked causally."""
        t = tokens.shape[1]
        positions = (
            (start + torch.arange(t, device=tokens.device)).clamp(max=self.max_seq_len - 1).unsqueeze(0)
        )

        slots = slot.expand(t)  # one index per token: advanced indexing, never a select view

        def write(i, k, v):
            k_cache[i, slots, :, positions[0]] = k[0]
            v_cache[i, slots, :, positions[0]] = v[0]

        def read(i, k, v):
            return k_cache[i, slot], v_cache[i, slot]

        key_pos = torch.arange(self.max_seq_len, device=tokens.device)
        mask = (key_pos.unsqueeze(0) <= positions[0].unsqueeze(1)).unsqueeze(0)
        hidden = self._run_layers(self.embed_tokens(tokens), positions, write, read, mask)
        return self.lm_head(hidden[:, last_index[0]])

    def decode(self, tokens, positions, k_cache, v_cache, kv_len: int) -> torch.Tensor:
        """One token for every slot. tokens [S], positions [S] (each slot's own); attention reads the
        first `kv_len` cache positions (the token-generation bucket). Returns logits [S, vocab]."""
        slots = torch.arange(tokens.shape[0], device=tokens.device)

        def write(i, k, v):
            k_cache[i, slots, :, positions] = k[:, 0]
            v_cache[i, slots, :, positions] = v[:, 0]

        def read(i, k, v):
            return k_cache[i, :, :, :kv_len], v_cache[i, :, :, :kv_len]

        key_pos = torch.arange(kv_len, device=tokens.device)
        mask = (key_pos.unsqueeze(0) <= positions.unsqueeze(1)).unsqueeze(1)
        hidden = self._run_layers(
            self.embed_tokens(tokens).unsqueeze(1), positions.unsqueeze(1), write, read, mask
        )
        return self.lm_head(hidden[:, 0])
