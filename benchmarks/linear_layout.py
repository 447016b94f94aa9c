"""The default model's matmuls in both operand orders, at the row counts an engine step has:
``x @ W^T`` (nn.Linear) and ``W @ x^T`` (`neuron_serve.model.linear.Linear`), same threads, one run.

    python -m benchmarks.linear_layout [--rows 1,8,16,32,64,96,128] [--dtype float32]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.peers import layer_groups
from neuron_serve.recipe.schema import torch_dtype
from neuron_serve.weights.loader import load_model_files


def _ms(fn, repeats: int = 5) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,16,32,64,96,128")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    dtype = torch_dtype(args.dtype)
    config = load_model_files("default", dtype).config
    shapes = [(n_out, n_in) for group in layer_groups(config) for _, n_out, n_in in group]
    weights = [torch.randn(shape, dtype=dtype) for shape in shapes]
    weights.append(torch.randn(config.vocab_size, config.hidden_size, dtype=dtype))  # lm_head
    print(f"{torch.get_num_threads()} threads, {args.dtype}: every linear of the default model once, ms")
    print(f"{'rows':>5} {'x @ W^T':>9} {'W @ x^T':>9}")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {size: torch.randn(rows, size, dtype=dtype) for size in {w.shape[1] for w in weights}}
        usual = _ms(lambda x=inputs: [F.linear(x[w.shape[1]], w) for w in weights])
        weight_first = _ms(lambda x=inputs: [torch.mm(w, x[w.shape[1]].t()).t() for w in weights])
        print(f"{rows:>5} {usual:>9.1f} {weight_first:>9.1f}")


if __name__ == "__main__":
    main()
