"""Tolerances, input builders and the NKI execution modes shared by the kernel tests.

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
- NKI emulator (nki_kernels.nki_emulator) vs reference: fp32 as the CPU kernels (the emulator
  computes in fp32 like the engines, only the order of sums differs), bf16 as the simulator (the
  same extra bf16 roundings of Tensor Engine operands).
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nki_kernels.nki_emulator import installed

CPU_TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-5)}
SIMULATOR_TOLERANCE = {torch.float32: (5e-3, 1e-3), torch.bfloat16: (2e-2, 2e-2)}
EMULATOR_TOLERANCE = {torch.float32: CPU_TOLERANCE[torch.float32], torch.bfloat16: SIMULATOR_TOLERANCE[torch.bfloat16]}

NKI_TOLERANCE = {"emulated": EMULATOR_TOLERANCE, "simulated": SIMULATOR_TOLERANCE}


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


def qkv_inputs(
    T: int,
    H: int,
    n_heads: int,
    n_kv_heads: int,
    hd: int,
    dtype: torch.dtype,
    *,
    with_bias: bool,
    seed: int,
    rope_offset: int = 0,
) -> tuple:
    """The arguments of qkv_rope, in its order (x, wq, wk, wv, bq, bk, bv, cos, sin, n_heads,
    n_kv_heads), for x [T, H]; cos/sin for positions rope_offset.."""
    g = torch.Generator().manual_seed(seed)
    heads = (n_heads, n_kv_heads, n_kv_heads)
    weights = [randn(n * hd, H, generator=g, dtype=dtype, scale=H**-0.5) for n in heads]
    biases = [randn(n * hd, generator=g, dtype=dtype) if with_bias else None for n in heads]
    cos, sin = rope_tables(T, hd, offset=rope_offset)
    return (randn(T, H, generator=g, dtype=dtype), *weights, *biases, cos, sin, n_heads, n_kv_heads)


def decode_inputs(
    S: int, H: int, G: int, L: int, D: int, dtype: torch.dtype, seed: int, lengths: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """decode_attention's q [S, H, D], k_cache, v_cache [S, G, L, D] and lengths [S] (random in 0..L
    when not given)."""
    g = torch.Generator().manual_seed(seed)
    q = randn(S, H, D, generator=g, dtype=dtype)
    k_cache, v_cache = randn(S, G, L, D, generator=g, dtype=dtype), randn(S, G, L, D, generator=g, dtype=dtype)
    if lengths is None:
        lengths = torch.randint(0, L + 1, (S,), generator=g)
    return q, k_cache, v_cache, torch.as_tensor(lengths, dtype=torch.int64)


def prefill_inputs(
    H: int, G: int, T: int, Lk: int, D: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prefill_attention's q [H, T, D] and k, v [G, Lk, D]."""
    g = torch.Generator().manual_seed(seed)
    return (
        randn(H, T, D, generator=g, dtype=dtype),
        randn(G, Lk, D, generator=g, dtype=dtype),
        randn(G, Lk, D, generator=g, dtype=dtype),
    )


def mlp_inputs(
    T: int, H: int, inter: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """swiglu_mlp's x [T, H] and nn.Linear weights w_gate, w_up [inter, H], w_down [H, inter],
    scaled so that activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    x = randn(T, H, generator=g, dtype=dtype)
    w_gate = randn(inter, H, generator=g, dtype=dtype, scale=H**-0.5)
    w_up = randn(inter, H, generator=g, dtype=dtype, scale=H**-0.5)
    return x, w_gate, w_up, randn(H, inter, generator=g, dtype=dtype, scale=inter**-0.5)


@dataclass(frozen=True)
class NkiRun:
    """The NKI kernels in one mode: `host` is nki_kernels.nki.host, whose functions take the CPU
    kernels' signatures and run the NKI kernels the mode's way."""

    mode: str
    host: types.ModuleType

    def assert_close(self, actual: torch.Tensor, expected: torch.Tensor) -> None:
        assert_close(actual, expected, NKI_TOLERANCE[self.mode])


@contextlib.contextmanager
def nki_run(mode: str) -> Iterator[NkiRun]:
    """ "emulated": our emulator stands in for `nki` until exit. "simulated": AWS's nki.simulate,
    which needs the real `nki` (see nki_kernels.nki_unavailable_reason), targeting Inferentia2."""
    if mode == "emulated":
        with installed():
            yield NkiRun(mode, _host())
    elif mode == "simulated":
        os.environ.setdefault("NEURON_PLATFORM_TARGET_OVERRIDE", "inf2")
        yield NkiRun(mode, _host())
    else:
        raise ValueError(f"unknown NKI mode {mode!r} (expected 'emulated' or 'simulated')")


def _host() -> types.ModuleType:
    # Imported here, not at the top: it imports `nki`, which must be the mode's.
    from nki_kernels.nki import host

    return host
