"""Tile sizes and constants shared by the NKI kernels and their CPU twins.

The CPU implementations use the same block sizes as the NKI kernels so that both walk the data in
the same order; the numbers come from NeuronCore-v2 (Inferentia2 / Trainium1) limits.
"""

from __future__ import annotations

# NeuronCore-v2 limits (NKI ISA docs): a tile has at most 128 partitions; nc_matmul's stationary
# operand has a free dim <= 128 and its moving operand a free dim <= 512, one 2 KiB PSUM bank of fp32.
PMAX = 128
STATIONARY_FMAX = 128
PSUM_FMAX = 512
SBUF_BYTES = 24 * 2**20
PSUM_BYTES = 2 * 2**20

# Decode attention: keys per flash-decoding block. One block's scores fill one PSUM bank
# (PSUM_FMAX), and its P @ V is four 128-key matmuls accumulated in PSUM.
DECODE_BLOCK = PSUM_FMAX
# Prefill attention: 128 query rows on the partitions, 512 keys per block (one PSUM bank).
PREFILL_BLOCK_Q = PMAX
PREFILL_BLOCK_K = PSUM_FMAX
# SwiGLU MLP: intermediate units per block; a block is four 128-row matmuls accumulated in PSUM,
# then added to the fp32 accumulator of the down projection.
MLP_BLOCK_I = PSUM_FMAX
# Sampling: vocabulary entries per tile. nisa.max8 reads at most 16384 elements per partition.
SAMPLE_TILE = 16384
# Sampling: candidates kept per row (a multiple of 8, since max8 yields 8 per instruction).
# top_k is capped at this, and a top-p nucleus never extends past it (as NxD Inference's global top-k).
MAX_CANDIDATES = 256

# Finite stand-in for -inf in masked scores: exp(NEG - m) is exactly 0 for any real m, while a fully
# masked block yields exp(NEG - NEG) = 1 instead of NaN. |score| < 3e22 is absorbed exactly
# (NEG + score == NEG in fp32), so masked keys cannot leak into the output.
NEG = -1.0e30


def ranges(total: int, block: int) -> list[tuple[int, int]]:
    """(start, size) of each block of `total` split into `block`-sized pieces; the last may be short.
    Also called inside NKI kernels, so it keeps to the Python subset the NKI 0.5 compiler accepts."""
    out = []
    for start in range(0, total, block):
        out.append((start, min(block, total - start)))
    return out
