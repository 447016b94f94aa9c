"""Host-side glue: the CPU functions' signatures on top of the NKI kernels, run in NKI's CPU
simulator (nki.simulate, which takes and returns torch tensors). It prepares the layouts the kernels
take (weights transposed, lengths and offsets as fp32) as the Neuron backend does once at load
time, so the simulator tests exercise the kernels' real entry points. Set
NEURON_PLATFORM_TARGET_OVERRIDE (e.g. inf2) before calling.
"""

from __future__ import annotations

import nki
import torch

from nki_kernels.nki.decode_attention import decode_attention_kernel
from nki_kernels.nki.prefill_attention import prefill_attention_kernel
from nki_kernels.nki.qkv_rope import qkv_rope_kernel
from nki_kernels.nki.rmsnorm_residual import rmsnorm_kernel, rmsnorm_residual_kernel
from nki_kernels.nki.sampling import sample_kernel
from nki_kernels.nki.swiglu_mlp import swiglu_mlp_kernel
from nki_kernels.tiles import MAX_CANDIDATES, SAMPLE_TILE


def _column(values: torch.Tensor) -> torch.Tensor:
    return values.float().reshape(-1, 1).contiguous()


def _row(values) -> torch.Tensor:
    return torch.as_tensor(values).float().reshape(1, -1).contiguous()


def rmsnorm_residual(x, residual, weight, eps):
    w = weight.reshape(1, -1).contiguous()
    if residual is None:
        return nki.simulate(rmsnorm_kernel)(x.contiguous(), w, eps), x
    return nki.simulate(rmsnorm_residual_kernel)(x.contiguous(), residual.contiguous(), w, eps)


def _qkv_layout(x, wq, wk, wv, bq, bk, bv):
    w_qkv_t = torch.cat([wq, wk, wv]).t().contiguous().to(x.dtype)
    biases = []
    for b, w in ((bq, wq), (bk, wk), (bv, wv)):
        biases.append(torch.zeros(w.shape[0]) if b is None else b.float())
    return w_qkv_t, _row(torch.cat(biases))


def qkv_rope(x, wq, wk, wv, bq, bk, bv, cos, sin, n_heads, n_kv_heads):
    w_qkv_t, bias = _qkv_layout(x, wq, wk, wv, bq, bk, bv)
    q, k, v = nki.simulate(qkv_rope_kernel)(
        x.contiguous(), w_qkv_t, bias, cos.float().contiguous(), sin.float().contiguous(), n_heads, n_kv_heads
    )
    T = x.shape[0]
    return q.view(T, n_heads, -1), k.view(T, n_kv_heads, -1), v.view(T, n_kv_heads, -1)


def decode_attention(q, k_cache, v_cache, lengths, scale):
    return nki.simulate(decode_attention_kernel)(
        q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), _row(lengths), scale
    )


def prefill_attention(q, k, v, q_offset, scale):
    return nki.simulate(prefill_attention_kernel)(q.contiguous(), k.contiguous(), v.contiguous(), _row(q_offset), scale)


def swiglu_mlp(x, w_gate, w_up, w_down):
    return nki.simulate(swiglu_mlp_kernel)(
        x.contiguous(), w_gate.t().contiguous(), w_up.t().contiguous(), w_down.t().contiguous()
    )


def sample(logits, temperature, top_k, top_p, uniform, tile=SAMPLE_TILE, max_candidates=MAX_CANDIDATES):
    greedy = temperature <= 0
    inv_t = torch.where(greedy, 1.0, 1.0 / temperature.float())
    ids = nki.simulate(sample_kernel)(
        logits.float().contiguous(),
        _column(inv_t),
        _column(greedy),
        _column(top_k),
        _column(top_p),
        _column(uniform),
        tile,
        max_candidates,
    )
    return ids.reshape(-1).to(torch.int64)
