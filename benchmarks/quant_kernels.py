"""Candidate CPU kernels for quantized linear layers, on the default model's matmul shapes.

    python -m benchmarks.quant_kernels [--rows 1,8,32] [--repeats 5] [--dtype float32|bfloat16]

All 30 layers' projections (q/k/v/o, gate/up/down; each layer its own weights, so they stream from
memory as in a real step) and then lm_head, each at 1, 8 and 32 rows, best of `--repeats`:

- the served float layer (``model/linear.py``, weight @ x^T) in fp32 or bf16;
- our int8 and int4 weight-only kernels (``neuron_serve::int8_weight_linear``,
  ``neuron_serve::int4_weight_linear``, group 32) and fbgemm's int8 dynamic linear as
  ``neuron_serve::int8_dynamic_linear`` calls it (``model/quant_ops.py``), one call per layer and one
  per group (q/k/v, gate/up);
- ATen's ``_weight_int8pack_mm`` (torchao's int8 weight-only CPU kernel) and
  ``_weight_int4pack_mm_for_cpu`` (torchao's int4 CPU kernel), group 32.

A kernel slower than the float layer on this CPU is shown as such; which one each method uses is decided by it.
With ``--dtype bfloat16`` the activations are bf16, as a recipe of dtype bf16 runs them (fbgemm and
ATen's int4 kernel take fp32 only).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from neuron_serve.model import cpu_kernels, quant_ops
from neuron_serve.model.linear import Linear
from neuron_serve.model.quantization import QuantSpec, quantize_weight

HIDDEN, INTERMEDIATE, VOCAB, LAYERS, KV = 576, 1536, 49152, 30, 192
GROUP = 32
# (out, in) of each projection, in groups that share an input
GROUPS = [
    [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN)],
    [(HIDDEN, HIDDEN)],
    [(INTERMEDIATE, HIDDEN)] * 2,
    [(HIDDEN, INTERMEDIATE)],
]

Op = Callable[[torch.Tensor], torch.Tensor]


def float_layers(weights: list[torch.Tensor], dtype: torch.dtype) -> list[Op]:
    layers = []
    for w in weights:
        layer = Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight.data = w.to(dtype)
        layers.append(layer)
    return layers


def kernel(method: str, weights: list[torch.Tensor], grouped: bool) -> list[Op]:
    """Our operator for `method`, on each weight alone or on all of them in one call."""
    stored = [quantize_weight(w, QuantSpec(method, GROUP)) for w in weights]
    parts = [stored] if grouped else [[s] for s in stored]
    op = getattr(torch.ops.neuron_serve, method.replace("-", "_") + "_linear")
    if method == "int4-weight":
        return [lambda x, p=p: op(x, *([s[t] for s in p] for t in ("weight", "scale", "zero")), GROUP) for p in parts]
    return [lambda x, p=p: op(x, [s["weight"] for s in p], [s["scale"] for s in p]) for p in parts]


def int8pack(weights: list[torch.Tensor]) -> list[Op]:
    ops = []
    for w in weights:
        s = quantize_weight(w, QuantSpec("int8-weight"))
        ops.append(lambda x, q=s["weight"], scale=s["scale"][:, 0]: torch.ops.aten._weight_int8pack_mm(x, q, scale))
    return ops


def int4pack(weights: list[torch.Tensor]) -> list[Op]:
    ops = []
    for w in weights:
        s = quantize_weight(w, QuantSpec("int4-weight", GROUP))
        tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(quant_ops.unpack_int4(s["weight"]).int(), 1)
        scale, zero = s["scale"].float(), s["zero"].float()
        # ATen dequantizes (q - 8) * scale + zero; ours is q * scale + zero.
        scale_zero = torch.stack([scale, zero + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        ops.append(lambda x, t=tiles, sz=scale_zero: torch.ops.aten._weight_int4pack_mm_for_cpu(x, t, GROUP, sz))
    return ops


def best_seconds(ops: list[Op], inputs: dict[int, torch.Tensor], in_features: list[int], repeats: int) -> float:
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for op, k in zip(ops, in_features, strict=True):
                op(inputs[k])
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cpu_kernels.load()
    layers = [[[torch.randn(n, k) * 0.02 for n, k in group] for group in GROUPS] for _ in range(LAYERS)]
    flat = [w for layer in layers for group in layer for w in group]
    grouped = [group for layer in layers for group in layer]
    lm_head = [torch.randn(VOCAB, HIDDEN) * 0.02]
    candidates = {
        f"{args.dtype} (Linear)": (lambda ws: float_layers(ws, dtype), False),
        "ours int8 weight-only": (lambda ws: kernel("int8-weight", ws, False), False),
        "ours int8 weight-only, grouped": (lambda ws: kernel("int8-weight", ws, True), True),
        "ours int4 weight-only, grouped": (lambda ws: kernel("int4-weight", ws, True), True),
        "fbgemm int8 dynamic": (lambda ws: kernel("int8-dynamic", ws, False), False),
        "fbgemm int8 dynamic, grouped": (lambda ws: kernel("int8-dynamic", ws, True), True),
        "aten _weight_int8pack_mm": (int8pack, False),
        "aten _weight_int4pack_mm_for_cpu": (int4pack, False),
    }
    if dtype == torch.bfloat16:
        candidates = {k: v for k, v in candidates.items() if k.startswith(("bfloat16", "ours"))}
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{torch.get_num_threads()} threads; ms for all {LAYERS} layers' projections | lm_head")
    print(f"{'kernel':34}" + "".join(f"{f'{r} rows':>18}" for r in rows))
    for name, (make, by_group) in candidates.items():
        if by_group:
            ops = [op for group in grouped for op in make(group)]
            in_features = [group[0].shape[1] for group in grouped]
        else:
            ops, in_features = make(flat), [w.shape[1] for w in flat]
        head = make(lm_head)
        cells = []
        for r in rows:
            inputs = {k: torch.randn(r, k, dtype=dtype) for k in (HIDDEN, INTERMEDIATE)}
            layers_s = best_seconds(ops, inputs, in_features, args.repeats)
            head_s = best_seconds(head, inputs, [HIDDEN], args.repeats)
            cells.append(f"{layers_s * 1e3:8.1f} | {head_s * 1e3:6.1f}")
        print(f"{name:34}" + "".join(f"{c:>18}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
