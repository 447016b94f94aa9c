"""Host-side glue: the CPU functions' signatures on top of the NKI kernels.

`NkiCalls(launch)` prepares the layouts the kernels take (weights transposed, lengths and offsets
as fp32 rows) and runs each kernel with ``launch``:

- ``nki.jit`` inside a model traced for a NeuronCore (``nki_kernels.registry``): the call becomes a
  custom call that the Neuron compiler builds into the graph's NEFF. The layout work is traced too,
  so it runs on the device every step;
- ``nki.simulate`` in NKI's CPU simulator (NKI >= 0.4 takes and returns torch tensors): the module
  functions below, which the simulator tests call. Set NEURON_PLATFORM_TARGET_OVERRIDE (e.g. inf2)
  before calling them.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _qkv_layout(x, wq, wk, wv, bq, bk, bv):
    w_qkv_t = torch.cat([wq, wk, wv]).t().contiguous().to(x.dtype)
    biases = []
    for b, w in ((bq, wq), (bk, wk), (bv, wv)):
        biases.append(torch.zeros(w.shape[0], device=w.device) if b is None else b.float())
    return w_qkv_t, _row(torch.cat(biases))


class NkiCalls:
    """The fused kernels with the CPU functions' signatures, each NKI kernel run by ``launch``."""

    def __init__(self, launch: Callable):
        self.launch = launch

    def rmsnorm_residual(self, x, residual, weight, eps):
        """x and residual [..., H], as the model has them; the kernels take rows [T, H]."""
        w, rows = weight.reshape(1, -1).contiguous(), x.reshape(-1, x.shape[-1]).contiguous()
        if residual is None:
            return self.launch(rmsnorm_kernel)(rows, w, eps).view(x.shape), x
        normed, stream = self.launch(rmsnorm_residual_kernel)(rows, residual.reshape(rows.shape).contiguous(), w, eps)
        return normed.view(x.shape), stream.view(x.shape)

    def qkv_rope(self, x, wq, wk, wv, bq, bk, bv, cos, sin, n_heads, n_kv_heads):
        w_qkv_t, bias = _qkv_layout(x, wq, wk, wv, bq, bk, bv)
        q, k, v = self.launch(qkv_rope_kernel)(
            x.contiguous(), w_qkv_t, bias, cos.float().contiguous(), sin.float().contiguous(), n_heads, n_kv_heads
        )
        T = x.shape[0]
        return q.view(T, n_heads, -1), k.view(T, n_kv_heads, -1), v.view(T, n_kv_heads, -1)

    def decode_attention(self, q, k_cache, v_cache, lengths, scale, return_lse=False):
        """With `return_lse`, lse [S, H] fp32 is the kernel's NEG, not the CPU's -inf, for a slot of
        length 0: either way the model's merge weight sigmoid(own - lse) is 1."""
        out, lse = self.launch(decode_attention_kernel)(
            q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), _row(lengths), scale
        )
        return (out, lse.reshape(q.shape[:2])) if return_lse else out

    def prefill_attention(self, q, k, v, q_offset, scale):
        offset = _row(q_offset)
        return self.launch(prefill_attention_kernel)(q.contiguous(), k.contiguous(), v.contiguous(), offset, scale)

    def swiglu_mlp(self, x, w_gate, w_up, w_down):
        return self.launch(swiglu_mlp_kernel)(
            x.contiguous(), w_gate.t().contiguous(), w_up.t().contiguous(), w_down.t().contiguous()
        )

    def sample(self, logits, temperature, top_k, top_p, uniform, tile=SAMPLE_TILE, max_candidates=MAX_CANDIDATES):
        greedy = temperature <= 0
        inv_t = torch.where(greedy, 1.0, 1.0 / temperature.float())
        ids = self.launch(sample_kernel)(
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


_SIMULATED = NkiCalls(nki.simulate)
rmsnorm_residual = _SIMULATED.rmsnorm_residual
qkv_rope = _SIMULATED.qkv_rope
decode_attention = _SIMULATED.decode_attention
prefill_attention = _SIMULATED.prefill_attention
swiglu_mlp = _SIMULATED.swiglu_mlp
sample = _SIMULATED.sample
