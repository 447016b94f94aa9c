"""Compile stage figures for a recipe (default: the default model): compile seconds per graph,
artifact size against one copy of the weights, cold start to the first token, and decode tokens/s of
the AOT graphs against the eager model at batch 1 and at the recipe's batch size.

    python benchmarks/compile_serve.py [compile/smollm2-135m-cpu.toml] [--steps 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from neuron_serve.backends.base import LoadTimes, run_decode, run_prompt
from neuron_serve.backends.cpu.runners import EagerRunner
from neuron_serve.backends.registry import open_runner
from neuron_serve.compiler.compile import compile_recipe
from neuron_serve.engine.forward_process import ForwardProcess
from neuron_serve.recipe.files import load_recipe
from neuron_serve.weights.loader import build_model, load_model_files


def decode_rate(runner, batch: int, steps: int, position: int = 200) -> float:
    """Tokens/s of decode steps of `batch` streams in slots 0..batch-1, all at `position`."""
    slots, tokens, positions = list(range(batch)), [17] * batch, [position] * batch
    run_decode(runner, slots, tokens, positions)
    started = time.perf_counter()
    for _ in range(steps):
        run_decode(runner, slots, tokens, positions)
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="compile/smollm2-135m-cpu.toml")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)

    result = compile_recipe(recipe)
    manifest = result.manifest
    print(f"compile: {result.seconds:.1f} s in total (cache hits: {sum(g.cache_hit for g in manifest.graphs)})")
    for graph in manifest.graphs:
        print(f"  {graph.name:<20} {graph.compile_seconds:>7.1f} s  {graph.size_bytes / 1e6:>6.1f} MB")
    weights = sum(manifest.files[w]["size"] for w in manifest.weights)
    total = sum(f["size"] for f in manifest.files.values())
    print(f"artifact: {total / 1e6:.0f} MB; one copy of the weights: {weights / 1e6:.0f} MB ({total / weights:.2f}x)")

    started = time.perf_counter()  # as a server worker starts: the forward process loads, this one the tokenizer
    times = LoadTimes()
    forward = ForwardProcess(result.out_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.out_dir / "tokenizer")
    forward.wait_ready(times)
    run_prompt(forward, tokenizer.encode("What is the capital of France?"), slot=0).argmax()
    cold = time.perf_counter() - started
    forward.close()
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in times.phases.items())
    print(f"cold start (start a replica, load the artifacts, first token): {cold:.2f} s ({phases})")

    runner, _ = open_runner(result.out_dir)
    shapes = recipe.shapes
    dtype = manifest.recipe.model.torch_dtype  # as compiled: "auto" resolved for this machine
    model = build_model(load_model_files(recipe.model.source, dtype), shapes.max_seq_len)
    eager = EagerRunner(model, runner.graphs)
    print(f"decode tokens/s ({torch.get_num_threads()} threads):  batch   aot    eager")
    for batch in sorted({1, shapes.batch_size}):
        aot_rate, eager_rate = decode_rate(runner, batch, args.steps), decode_rate(eager, batch, args.steps)
        print(f"{'':>36}{batch:>5} {aot_rate:>6.1f} {eager_rate:>7.1f}")


if __name__ == "__main__":
    Path("artifacts").mkdir(exist_ok=True)
    main()
