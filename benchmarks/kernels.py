"""CPU benchmark of the fused kernels against the unfused torch ops they replace.

Shapes are the default model's (SmolLM2-135M: hidden 576, 9 heads, 3 KV heads, head_dim 64,
intermediate 1536, vocab 49152), fp32, batch 1 and 32. "unfused" is the plain-op sequence a model
would otherwise run (nki_kernels.reference, or an HF-style sort-based sampler); "torch fused" is
torch's own fused op where one exists (scaled_dot_product_attention). Prints one table; takes about
a minute on two cores.

    python benchmarks/kernels.py [--threads N] [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import nki_kernels as fused
from nki_kernels import reference

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB = 576, 9, 3, 64, 1536, 49152
SCALE = HEAD_DIM**-0.5


def timed_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall time of one call of each, in ms. The variants take turns, so that load from other
    processes on a shared machine hits them alike."""
    for fn in fns.values():
        fn()
        fn()
    samples: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeat):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[label].append((time.perf_counter() - start) * 1e3)
    return {label: statistics.median(values) for label, values in samples.items()}


def sdpa_decode(q, k_cache, v_cache, lengths):
    visible = torch.arange(k_cache.shape[2]) < lengths[:, None]
    out = F.scaled_dot_product_attention(
        q[:, :, None], k_cache, v_cache, attn_mask=visible[:, None, None, :], scale=SCALE, enable_gqa=True
    )
    return out[:, :, 0]


def sort_based_sample(logits, temperature, top_k, top_p, uniform):
    """The usual vectorised sampler: full softmax and sort, top-k/top-p masks, inverse CDF."""
    greedy = temperature <= 0
    x = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]
    values, order = torch.sort(x, dim=-1, descending=True)
    rank = torch.arange(x.shape[1])[None, :]
    probs = torch.softmax(values, dim=-1)
    keep = (rank < top_k[:, None]) | (top_k[:, None] <= 0)
    keep &= (torch.cumsum(probs, dim=-1) - probs) < top_p[:, None]
    cdf = torch.cumsum(probs * keep, dim=-1)
    pick = (cdf <= uniform[:, None] * cdf[:, -1:]).sum(dim=-1).clamp(max=x.shape[1] - 1)
    return torch.where(greedy, x.argmax(dim=-1), order.gather(1, pick[:, None])[:, 0])


def cases(batch: int) -> list[tuple[str, str, dict[str, Callable[[], object]]]]:
    g = torch.Generator().manual_seed(batch)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    x, residual, norm_w = rand(batch, HIDDEN), rand(batch, HIDDEN), rand(HIDDEN)
    wq, wk, wv = rand(HEADS * HEAD_DIM, HIDDEN), rand(KV_HEADS * HEAD_DIM, HIDDEN), rand(KV_HEADS * HEAD_DIM, HIDDEN)
    cos, sin = rand(batch, HEAD_DIM), rand(batch, HEAD_DIM)
    qkv_args = (x, wq, wk, wv, None, None, None, cos, sin, HEADS, KV_HEADS)
    w_gate, w_up, w_down = rand(INTERMEDIATE, HIDDEN), rand(INTERMEDIATE, HIDDEN), rand(HIDDEN, INTERMEDIATE)
    out = [
        (
            "rmsnorm_residual",
            f"T={batch}",
            {
                "fused": lambda: fused.rmsnorm_residual(x, residual, norm_w, 1e-5),
                "unfused": lambda: reference.rmsnorm_residual(x, residual, norm_w, 1e-5),
            },
        ),
        (
            "qkv_rope",
            f"T={batch}",
            {
                "fused": lambda: fused.qkv_rope(*qkv_args),
                "unfused": lambda: reference.qkv_rope(*qkv_args),
            },
        ),
    ]
    for length in (512, 2048):
        q = rand(batch, HEADS, HEAD_DIM)
        k_cache, v_cache = rand(batch, KV_HEADS, length, HEAD_DIM), rand(batch, KV_HEADS, length, HEAD_DIM)
        lengths = torch.randint(1, length + 1, (batch,), generator=g)
        args = (q, k_cache, v_cache, lengths)
        out.append(
            (
                "decode_attention",
                f"S={batch} L={length}",
                {
                    "fused": lambda args=args: fused.decode_attention(*args, SCALE),
                    "unfused": lambda args=args: reference.decode_attention(*args, SCALE),
                    "torch fused": lambda args=args: sdpa_decode(*args),
                },
            )
        )
    out.append(
        (
            "swiglu_mlp",
            f"T={batch}",
            {
                "fused": lambda: fused.swiglu_mlp(x, w_gate, w_up, w_down),
                "unfused": lambda: reference.swiglu_mlp(x, w_gate, w_up, w_down),
            },
        )
    )
    logits, uniform = rand(batch, VOCAB) * 3, torch.rand(batch, generator=g)
    temperature = torch.full((batch,), 0.8)
    for label, top_k, top_p in (("top_k=50 top_p=0.9", 50, 0.9), ("filters off", 0, 1.0)):
        args = (logits, temperature, torch.full((batch,), top_k), torch.full((batch,), top_p), uniform)
        out.append(
            (
                "sampling",
                f"S={batch} {label}",
                {
                    "fused": lambda args=args: fused.sample(*args),
                    "unfused": lambda args=args: sort_based_sample(*args),
                },
            )
        )
    return out


def prefill_cases() -> list[tuple[str, str, dict[str, Callable[[], object]]]]:
    g = torch.Generator().manual_seed(7)
    out = []
    # A tensor q_offset (as an exported graph passes it) visits every key block; an int one lets the
    # CPU version skip the blocks wholly past the causal limit.
    for tokens, offset, as_tensor in ((512, 0, True), (512, 0, False), (512, 1536, True)):
        q = torch.randn(HEADS, tokens, HEAD_DIM, generator=g)
        k = torch.randn(KV_HEADS, offset + tokens, HEAD_DIM, generator=g)
        v = torch.randn(KV_HEADS, offset + tokens, HEAD_DIM, generator=g)
        visible = torch.arange(offset + tokens)[None, :] <= torch.arange(tokens)[:, None] + offset
        q_offset = torch.tensor(offset) if as_tensor else offset
        kind = "tensor" if as_tensor else "int"
        out.append(
            (
                "prefill_attention",
                f"T={tokens} offset={offset} ({kind})",
                {
                    "fused": lambda q=q, k=k, v=v, o=q_offset: fused.prefill_attention(q, k, v, o, SCALE),
                    "unfused": lambda q=q, k=k, v=v, o=offset: reference.prefill_attention(q, k, v, o, SCALE),
                    "torch fused": lambda q=q, k=k, v=v, m=visible: F.scaled_dot_product_attention(
                        q, k, v, attn_mask=m, scale=SCALE, enable_gqa=True
                    ),
                },
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = cases(1) + cases(32) + prefill_cases()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, median of {args.repeat}")
    print("| kernel | shape | fused ms | unfused ms | torch fused ms | speedup vs unfused |")
    print("|---|---|---:|---:|---:|---:|")
    with torch.inference_mode():
        for name, shape, fns in rows:
            ms = timed_ms(fns, args.repeat)
            torch_fused = f"{ms['torch fused']:.3f}" if "torch fused" in ms else "-"
            speedup = ms["unfused"] / ms["fused"]
            print(f"| {name} | {shape} | {ms['fused']:.3f} | {ms['unfused']:.3f} | {torch_fused} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
