"""Tolerances and input builders shared by the kernel tests (CPU and NKI simulator).

Tolerances, and why:
- CPU kernels vs reference, fp32: rtol 1e-4, atol 1e-5. Both compute in fp32 from the same inputs
  and differ only in the order of fp32 sums (blocked matmuls, online-softmax merges over <= a few
  thousand terms): observed differences are ~1e-7..1e-6 relative, and any masking or indexing bug
  shows up as an O(1) error, far above these.
- CPU kernels vs reference, bf16: rtol 2e-2, atol 1e-5 (the NKI library's bf16 convention). Both
  compute in fp32 and round once to bf16 at the end, so they differ by at most one bf16 ulp
  (<= 2^-7 relative, under 2e-2); below 1e-3 an ulp is < 1e-5, which atol covers.
- NKI simulator vs reference, fp32: rtol 5e-3, atol 1e-3. The Scalar Engine evaluates exp, silu
  and rsqrt with piecewise polynomials, and fp32 matmuls go through the Tensor Engine.
- NKI simulator vs reference, bf16: rtol 2e-2, atol 2e-2. The kernels feed bf16 operands to the
  Tensor Engine where the CPU twins keep fp32 (softmax probabilities before P @ V, silu(g) * u
  before the down projection): an extra bf16 rounding of terms of size <= 1.
"""

from __future__ import annotations

import torch

CPU_TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-5)}
SIMULATOR_TOLERANCE = {torch.float32: (5e-3, 1e-3), torch.bfloat16: (2e-2, 2e-2)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: dict = CPU_TOLERANCE) -> None:
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    rtol, atol = tolerance[expected.dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def randn(*shape: int, generator: torch.Generator, dtype: torch.dtype = torch.float32, scale: float = 1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def rope_tables(T: int, hd: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face style cos/sin [T, hd] for positions offset..offset+T-1."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.arange(offset, offset + T).float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()
