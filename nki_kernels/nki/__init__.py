"""NKI (>= 0.5) implementations of the fused kernels, for NeuronCores.

Importing this package imports `nki`; check nki_kernels.nki_available() first. The kernels take
Neuron-friendly layouts (transposed weights, fp32 lengths); nki_kernels.nki.host shows how the CPU
signatures map onto them. Status: written against the NKI 0.5 API documentation (NkiTensor.broadcast
is new in 0.5) and never compiled, simulated or run on a NeuronCore; run in our numpy emulator, with
its SBUF/PSUM capacity checks, at Llama-3.1-8B TP 8 sizes (see nki_kernels/README.md).
"""

from nki_kernels.nki.decode_attention import decode_attention_kernel
from nki_kernels.nki.prefill_attention import prefill_attention_kernel
from nki_kernels.nki.qkv_rope import qkv_rope_kernel
from nki_kernels.nki.rmsnorm_residual import rmsnorm_kernel, rmsnorm_residual_kernel
from nki_kernels.nki.sampling import sample_kernel
from nki_kernels.nki.swiglu_mlp import swiglu_mlp_kernel

__all__ = [
    "decode_attention_kernel",
    "prefill_attention_kernel",
    "qkv_rope_kernel",
    "rmsnorm_kernel",
    "rmsnorm_residual_kernel",
    "sample_kernel",
    "swiglu_mlp_kernel",
]
