"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) with static shapes and a static KV cache.

One implementation serves every backend. The KV cache (``kv_cache.py``) is an argument that the
forwards only read; each returns the keys and values it made and the caller stores them. Graphs
traced from these forwards are pure functions: one cache and one copy of the weights serve every
bucket's graph, and no compiler has to turn an in-place write into a copy of the whole cache.
q/k/v/o and gate/up/down stay separate linear layers: the tensor-parallel split shards them
column- or row-wise (see ``sharding.py``).

`kernels` names the fused kernels of ``nki_kernels`` to use in place of the plain ops (a recipe's
``[kernels] enabled``), and `kernel_device` which implementation (`nki_kernels.registry`: the CPU
tiled versions, or the NKI kernels for a NeuronCore); with none, the forwards are plain PyTorch ops.
"sampling" is the engine's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import nki_kernels
from neuron_serve.model import cpu_kernels
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.kv_cache import KVCache
from neuron_serve.model.linear import Linear
from neuron_serve.model.parallel import TensorParallel
from neuron_serve.model.quantization import linear_group
from neuron_serve.model.rope import rope_tables
from nki_kernels.reference import apply_rope
from nki_kernels.registry import Kernels


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, fused: Kernels | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fused = (fused or Kernels()).rmsnorm_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, new_residual): a sublayer's output `x` added to the residual stream (None before
        the first sublayer: the stream is `x` itself), and the new stream normed."""
        if self.fused is not None:
            return self.fused(x, residual, self.weight, self.eps)
        stream = x if residual is None else x + residual
        return self(stream), stream


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, fused: Kernels | None = None):
        super().__init__()
        hd = config.head_dim
        self.head_dim = hd
        self.n_heads = config.num_attention_heads // tp.degree
        self.n_kv_heads = tp.local_kv_heads(config.num_key_value_heads)
        self.tp = tp
        self.fused = fused or Kernels()
        self.q_proj = Linear(config.hidden_size, self.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = Linear(config.hidden_size, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = Linear(config.hidden_size, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = Linear(self.n_heads * hd, config.hidden_size, bias=config.o_bias and tp.rank == 0)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, H] -> q [B, T, heads, hd], k and v [B, T, kv_heads, hd], RoPE applied to q and k."""
        b, t, _ = x.shape
        if self.fused.qkv_rope is not None:
            return self._project_fused(x, cos, sin)
        q, k, v = linear_group(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.reshape(b, t, self.n_heads, self.head_dim)
        k = k.reshape(b, t, self.n_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.n_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _project_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, t, h = x.shape
        hd = self.head_dim
        q, k, v = self.fused.qkv_rope(
            x.reshape(b * t, h),
            self.q_proj.weight,
            self.k_proj.weight,
            self.v_proj.weight,
            self.q_proj.bias,
            self.k_proj.bias,
            self.v_proj.bias,
            cos.reshape(b * t, hd),
            sin.reshape(b * t, hd),
            self.n_heads,
            self.n_kv_heads,
        )
        return q.view(b, t, self.n_heads, hd), k.view(b, t, self.n_kv_heads, hd), v.view(b, t, self.n_kv_heads, hd)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """The attention's output projection of the heads' results ([B, T, heads*hd]), summed over ranks.
        Separate from the attends below, so that a step's decode and prompt tokens share one o_proj."""
        return self.tp.all_reduce(self.o_proj(attended))

    def attend_prompt(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        """q [1, T, heads, hd]; keys/values [1, kv_heads, Lk, hd]; mask from `prompt_mask`. The
        query heads that share a KV head are folded into the query length, so GQA never copies the
        keys (repeat_interleave would read them `group` times)."""
        b, t, _, hd = q.shape
        group = self.n_heads // self.n_kv_heads
        q = q.reshape(b, t, self.n_kv_heads, group, hd).permute(0, 2, 3, 1, 4)
        q = q.reshape(b, self.n_kv_heads, group * t, hd)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return out.reshape(b, self.n_kv_heads, group, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, -1)

    def attend_causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """`attend_prompt` for a prompt from position 0 with the prefill_attention kernel: q [1, T,
        heads, hd], k/v [1, T, kv_heads, hd] (the prompt's own); query i sees keys 0..i."""
        _, t, _, hd = q.shape
        q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # heads first: [heads, T, hd]
        out = self.fused.prefill_attention(q, k, v, 0, hd**-0.5)
        return out.transpose(0, 1).reshape(1, t, -1)

    def attend_decode(self, q, k, v, k_cache: torch.Tensor, v_cache: torch.Tensor, bias: torch.Tensor):
        """One query per slot. q [S, 1, heads, hd]; k/v [S, 1, kv_heads, hd] (this step's, not yet
        in the cache); k_cache/v_cache [S, kv_heads, Lk, hd]; bias from `decode_bias` hides the cache
        positions at or after each slot's own. The cache is only read: the caller writes k/v."""
        s, _, _, hd = q.shape
        q = q.reshape(s, self.n_kv_heads, -1, hd)
        scale = hd**-0.5
        cached = torch.matmul(q, k_cache.transpose(-1, -2)) * scale + bias
        own = (q * k.reshape(s, self.n_kv_heads, 1, hd)).sum(-1, keepdim=True) * scale
        probs = torch.softmax(torch.cat([cached, own], dim=-1).float(), dim=-1).to(q.dtype)
        lk = k_cache.shape[2]
        out = torch.matmul(probs[..., :lk], v_cache) + probs[..., lk:] * v.reshape(s, self.n_kv_heads, 1, hd)
        return out.reshape(s, 1, -1)

    def attend_decode_cached(self, q, k, v, k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int, positions):
        """`attend_decode` by the CPU's decode_attention operator (``cpu_kernels.py``): each slot reads
        exactly its cached positions 0..position-1 of `layer` in the whole cache [layers, slots,
        kv_heads, max_seq_len, hd], no KV bucket, no mask."""
        s, _, _, hd = q.shape
        k, v = (x.reshape(s, self.n_kv_heads, hd) for x in (k, v))
        out = torch.ops.neuron_serve.decode_attention(
            q.reshape(s, self.n_heads, hd), k, v, k_cache, v_cache, layer, positions, hd**-0.5
        )
        return out.reshape(s, 1, -1)

    def attend_decode_fused(self, q, k, v, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor):
        """`attend_decode` with the decode_attention kernel: it attends each slot's cached keys
        0..position-1 and returns their log-sum-exp, and this step's own key (not in the cache yet)
        is merged in as one more flash-decoding block. That block's softmax weight against the
        cached ones is e^own / (e^lse + e^own) = sigmoid(own - lse): 1 for a slot at position 0
        (lse = -inf, no cached keys), whose output is then its own value."""
        s, _, _, hd = q.shape
        scale = hd**-0.5
        cached, lse = self.fused.decode_attention(q[:, 0], k_cache, v_cache, positions, scale, return_lse=True)
        q = q.reshape(s, self.n_kv_heads, -1, hd).float()
        own = (q * k.reshape(s, self.n_kv_heads, 1, hd).float()).sum(-1) * scale  # [S, kv_heads, group]
        weight = torch.sigmoid(own.reshape(s, -1) - lse).unsqueeze(-1)  # [S, heads, 1]
        own_value = v.reshape(s, self.n_kv_heads, 1, hd).expand(-1, -1, q.shape[2], -1).reshape(s, -1, hd)
        out = torch.lerp(cached.float(), own_value.float(), weight).to(v.dtype)
        return out.reshape(s, 1, -1)


def reads_exact_decode_keys(kernels: frozenset[str], kernel_device: str) -> bool:
    """Whether a model's decode rows attend through the CPU's decode_attention operator, which reads
    each slot's own cached positions: then a step's KV bucket need only hold a continued prompt's."""
    return kernel_device == "cpu" and "decode_attention" not in kernels


def masked_score(dtype: torch.dtype) -> float:
    """The score of a key a query must not see: the dtype's lowest finite value, as NxD Inference
    masks, not -inf, whose arithmetic on a NeuronCore can give NaN (see the compiler flags)."""
    return torch.finfo(dtype).min


def prompt_mask(visible: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """visible [T, Lk] (True = key visible to query) -> additive SDPA mask [1, 1, group*T, Lk] for
    folded heads. Every query sees at least itself, so no row is all masked."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, masked_score(dtype))
    return mask.repeat(group, 1).unsqueeze(0).unsqueeze(0)


def decode_bias(positions: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [S, 1, 1, kv_len]: 0 for cache positions before each slot's position, masked from it on."""
    key_pos = torch.arange(kv_len, device=positions.device)
    hidden = key_pos.unsqueeze(0) >= positions.unsqueeze(1)
    return (
        torch.zeros(hidden.shape, dtype=dtype, device=positions.device)
        .masked_fill(hidden, masked_score(dtype))
        .reshape(-1, 1, 1, kv_len)
    )


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, fused: Kernels | None = None):
        super().__init__()
        inter = config.intermediate_size // tp.degree
        self.gate_proj = Linear(config.hidden_size, inter, bias=False)
        self.up_proj = Linear(config.hidden_size, inter, bias=False)
        self.down_proj = Linear(inter, config.hidden_size, bias=False)
        self.tp = tp
        self.fused = (fused or Kernels()).swiglu_mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
            out = self.fused(x.reshape(-1, x.shape[-1]), *weights).reshape(x.shape)
        else:
            gate, up = linear_group(x, (self.gate_proj, self.up_proj))
            out = self.down_proj(F.silu(gate) * up)
        return self.tp.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, fused: Kernels):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        self.self_attn = Attention(config, tp, fused)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        self.mlp = MLP(config, tp, fused)


class LlamaModel(nn.Module):
    """Parameter names follow Hugging Face's ``LlamaForCausalLM`` without the ``model.`` prefix."""

    def __init__(
        self,
        config: ModelConfig,
        max_seq_len: int,
        tp: TensorParallel | None = None,
        kernels: frozenset[str] = frozenset(),
        kernel_device: str = "cpu",
    ):
        super().__init__()
        unknown = set(kernels) - set(nki_kernels.KERNELS)
        if unknown:
            raise ValueError(f"unknown kernels {sorted(unknown)}; known: {', '.join(nki_kernels.KERNELS)}")
        self.config = config
        self.max_seq_len = max_seq_len
        self.tp = tp or TensorParallel()
        self.kernels = frozenset(kernels)
        self.exact_decode_keys = reads_exact_decode_keys(self.kernels, kernel_device)
        if self.exact_decode_keys:
            cpu_kernels.load()
        fused = Kernels.enabled(self.kernels, kernel_device)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, self.tp, fused) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused)
        # Embeddings and lm_head are replicated on every rank: sampling then needs no all-gather of
        # the logits, and for the models served here their size is small next to the layers.
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        attention = self.layers[0].self_attn  # per rank: KV heads may be replicated under TP
        self.group = attention.n_heads // attention.n_kv_heads
        cos, sin = rope_tables(config, max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def new_kv_cache(self, slots: int) -> KVCache:
        """A cache for `slots` sequences, in this rank's KV heads and the weights' dtype."""
        return KVCache.for_rank(self.config, self.tp, slots, self.max_seq_len, self.dtype)

    def _run_layers(self, x: torch.Tensor, positions: torch.Tensor, attend):
        """The shared body. `attend(i, attention, q, k, v)` returns layer i's attended heads
        ([B, T, heads*hd], before the output projection).
        Returns the final hidden states and this call's keys and values, stacked over layers
        ([layers, B, T, kv_heads, hd]), for the caller to store in the cache."""
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        new_keys, new_values = [], []
        # Each sublayer's output joins the residual stream in the norm that follows it, so the add
        # and the norm can be one kernel (rmsnorm_residual); the stream starts as the embeddings.
        out, residual = x, None
        for i, layer in enumerate(self.layers):
            normed, residual = layer.input_layernorm.add_and_norm(out, residual)
            q, k, v = layer.self_attn.project(normed, cos, sin)
            new_keys.append(k)
            new_values.append(v)
            out = layer.self_attn.output(attend(i, layer.self_attn, q, k, v))
            normed, residual = layer.post_attention_layernorm.add_and_norm(out, residual)
            out = layer.mlp(normed)
        hidden, _ = self.norm.add_and_norm(out, residual)
        return hidden, torch.stack(new_keys), torch.stack(new_values)

    def prefill(self, tokens: torch.Tensor, last_index: torch.Tensor):
        """A prompt from position 0: tokens [1, T] (padded at the end), last_index [1] the position of
        the last real token. Reads no cache. Returns (logits [1, vocab], keys, values [layers, 1, T,
        kv_heads, hd])."""
        hidden, keys, values = self._prompt_hidden(tokens)
        return self.lm_head(hidden.index_select(1, last_index)[:, 0]), keys, values

    def prompt_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits [T, vocab] after each token of a prompt from position 0 (tokens [1, T]): for
        measuring a model (perplexity, agreement), not for serving."""
        hidden, _, _ = self._prompt_hidden(tokens)
        return self.lm_head(hidden[0])

    def _prompt_hidden(self, tokens: torch.Tensor):
        t = tokens.shape[1]
        positions = torch.arange(t, device=tokens.device).unsqueeze(0)
        if "prefill_attention" in self.kernels:

            def attend(i, attention, q, k, v):
                return attention.attend_causal(q, k, v)

        else:
            mask = prompt_mask(torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril(), self.group, self.dtype)

            def attend(i, attention, q, k, v):
                return attention.attend_prompt(q, k.transpose(1, 2), v.transpose(1, 2), mask)

        return self._run_layers(self.embed_tokens(tokens), positions, attend)

    def decode(self, tokens, positions, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int):
        """One token for every slot: tokens [S], positions [S] (each slot's own). Attention reads the
        first `kv_len` positions of the cache (the token-generation bucket) and this step's own key.
        Returns (logits [S, vocab], keys, values [layers, S, 1, kv_heads, hd])."""
        attend = self._decode_attention(positions, kv_len, k_cache, v_cache)
        hidden, keys, values = self._run_layers(self.embed_tokens(tokens).unsqueeze(1), positions.unsqueeze(1), attend)
        return self.lm_head(hidden[:, 0]), keys, values

    def _decode_attention(self, positions: torch.Tensor, kv_len: int, k_cache: torch.Tensor, v_cache: torch.Tensor):
        """attend(i, attention, q, k, v) of decode rows (``_run_layers``): row r is slot r, at positions[r],
        with one query [S, 1, heads, hd]; it attends up to `kv_len` cached positions and its own key."""
        s = positions.shape[0]
        if self.exact_decode_keys:

            def attend(i, attention, q, k, v):
                return attention.attend_decode_cached(q, k, v, k_cache, v_cache, i, positions)

        elif "decode_attention" in self.kernels:

            def attend(i, attention, q, k, v):
                cache = k_cache[i, :s, :, :kv_len], v_cache[i, :s, :, :kv_len]
                return attention.attend_decode_fused(q, k, v, *cache, positions)

        else:
            bias = decode_bias(positions, kv_len, self.dtype)

            def attend(i, attention, q, k, v):
                return attention.attend_decode(q, k, v, k_cache[i, :s, :, :kv_len], v_cache[i, :s, :, :kv_len], bias)

        return attend

    def step(
        self, decode_tokens, decode_positions, tokens, positions, cached_slot, visible, last_index, k_cache, v_cache
    ):
        """One engine step (``step.py``): S decode rows (slots 0..S-1) and P packed prompt tokens in
        one pass, so each weight is read once. Decode rows attend their own slot's first L cache
        positions (with `exact_decode_keys`, the positions before their own) and their own key;
        prompt tokens attend what `visible` [P, L + P] shows of the row `cached_slot` and of the
        step's prompt tokens. Returns (logits [S + R, vocab] for the decode rows then the prompt
        tokens at `last_index`, keys, values [layers, 1, S + P, kv_heads, hd])."""
        s, p = decode_tokens.shape[0], tokens.shape[0]
        kv_len = visible.shape[1] - p
        mask = prompt_mask(visible, self.group, self.dtype)
        attend_decode = self._decode_attention(decode_positions, kv_len, k_cache, v_cache)

        def attend(i, attention, q, k, v):
            decoded = attend_decode(i, attention, *(x[0, :s].unsqueeze(1) for x in (q, k, v)))
            row_k = k_cache[i, :, :, :kv_len].index_select(0, cached_slot)
            row_v = v_cache[i, :, :, :kv_len].index_select(0, cached_slot)
            keys = torch.cat([row_k, k[:, s:].transpose(1, 2)], dim=2)
            values = torch.cat([row_v, v[:, s:].transpose(1, 2)], dim=2)
            prompted = attention.attend_prompt(q[:, s:], keys, values, mask)
            return torch.cat([decoded.reshape(1, s, -1), prompted], dim=1)

        x = self.embed_tokens(torch.cat([decode_tokens, tokens])).unsqueeze(0)
        hidden, keys, values = self._run_layers(x, torch.cat([decode_positions, positions]).unsqueeze(0), attend)
        rows = torch.cat([torch.arange(s, device=tokens.device), s + last_index])
        return self.lm_head(hidden[0].index_select(0, rows)), keys, values

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype
