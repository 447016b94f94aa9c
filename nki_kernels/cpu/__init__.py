"""CPU implementations of the fused kernels: the NKI kernels' tiled algorithms in plain torch ops,
traceable by torch.export (no Python branches on tensor values)."""

from nki_kernels.cpu.attention import decode_attention, prefill_attention
from nki_kernels.cpu.mlp import swiglu_mlp
from nki_kernels.cpu.norm import rmsnorm_residual
from nki_kernels.cpu.qkv import qkv_rope
from nki_kernels.cpu.sampling import sample

__all__ = [
    "decode_attention",
    "prefill_attention",
    "qkv_rope",
    "rmsnorm_residual",
    "sample",
    "swiglu_mlp",
]
