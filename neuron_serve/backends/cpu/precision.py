"""The dtype a recipe's ``model.dtype = "auto"`` means on this CPU.

bf16 halves the bytes every decode step reads, but only CPUs with bf16 instructions (AMD Zen 4's
``avx512_bf16``, Intel's AMX) multiply in it natively; elsewhere oneDNN emulates it. Measured on an
AVX2-only AMD EPYC (2 threads, torch 2.13): a 2048² matmul ran at 116 GFLOP/s in fp32, and a 512²
one at 1.2 GFLOP/s in bf16, so fp32 is the only choice there (`benchmarks/roofline.py` shows both).
"""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The instruction-set flags of the first CPU ({} where /proc/cpuinfo is missing)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_dtype(flags: set[str]) -> tuple[str, str]:
    """(dtype, why) for a CPU with these flags."""
    native = [f for f in BF16_FLAGS if f in flags]
    if native:
        return "bfloat16", f"this CPU has {' and '.join(native)}: bf16 matmuls run natively"
    return "float32", "this CPU has neither avx512_bf16 nor amx_bf16: bf16 matmuls would be emulated, slower than fp32"
