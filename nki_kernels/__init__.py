"""Fused kernels for the hot operations of Llama-family decoding.

Each kernel has a plain-PyTorch reference (`nki_kernels.reference`, the semantics), a CPU
implementation of its tiled algorithm (exported here, traceable by torch.export) and an NKI
implementation for NeuronCores (`nki_kernels.nki`, importable only where the `nki` package is;
importing this package never imports `nki`).
"""

from nki_kernels import reference
from nki_kernels.availability import nki_available, nki_unavailable_reason
from nki_kernels.cpu import (
    decode_attention,
    prefill_attention,
    qkv_rope,
    rmsnorm_residual,
    sample,
    swiglu_mlp,
)

# Names a recipe may list under [kernels] enabled; "sampling" is the `sample` function.
KERNELS: tuple[str, ...] = (
    "rmsnorm_residual",
    "qkv_rope",
    "decode_attention",
    "prefill_attention",
    "swiglu_mlp",
    "sampling",
)

__all__ = [
    "KERNELS",
    "decode_attention",
    "nki_available",
    "nki_unavailable_reason",
    "prefill_attention",
    "qkv_rope",
    "reference",
    "rmsnorm_residual",
    "sample",
    "swiglu_mlp",
]
