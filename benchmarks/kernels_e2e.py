"""End-to-end decode throughput of the default model with the fused kernels off, one at a time, and all on.

    python benchmarks/kernels_e2e.py [--batches 1,8] [--kv-len 256] [--steps 16] [--rounds 5] [--no-aot]

SmolLM2-135M, fp32, on this machine's CPU threads. A decode step is one forward over `kv_len` cache
positions plus sampling every row at temperature 0.8, top-k 50, top-p 0.9, as the engine does it:
the per-request sampler row by row, or the `sample` kernel over all rows when "sampling" is on.
"eager" calls the PyTorch model; "aot" compiles one decode graph per configuration and batch size
with torch.export + AOTInductor into a temporary directory (≈ 40 s each; configurations whose
decode graph is the same share it). Configurations take turns within each round, so that load from
other processes hits them alike; figures are medians over rounds. prefill_attention has no op in a
decode step, so the last column times an eager prefill of a `kv_len`-token prompt.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import nki_kernels
from neuron_serve.backends.cpu.export import AOTI_CONFIG, constants_map
from neuron_serve.engine.sampler import SamplingParams, sample_row
from neuron_serve.model.kv_cache import KVCache
from neuron_serve.model.llama import LlamaModel
from neuron_serve.model.state import model_from_state_dict
from neuron_serve.weights.loader import load_model_files

MAX_SEQ_LEN = 2048
PARAMS = SamplingParams(temperature=0.8, top_k=50, top_p=0.9)
# Kernels with no op in a decode graph: configurations differing only in these share one graph.
NOT_IN_DECODE_GRAPH = frozenset({"prefill_attention", "sampling"})


def configurations() -> dict[str, frozenset[str]]:
    alone = {name: frozenset({name}) for name in nki_kernels.KERNELS}
    return {"off": frozenset(), **alone, "all": frozenset(nki_kernels.KERNELS)}


def sampler(kernels: frozenset[str], batch: int) -> Callable[[torch.Tensor], object]:
    generators = [torch.Generator().manual_seed(row) for row in range(batch)]
    if "sampling" not in kernels:
        return lambda logits: [sample_row(row, PARAMS, g) for row, g in zip(logits, generators, strict=True)]
    temperature, top_k = torch.full((batch,), PARAMS.temperature), torch.full((batch,), PARAMS.top_k)
    top_p = torch.full((batch,), PARAMS.top_p, dtype=torch.float64)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
        return nki_kernels.sample(logits, temperature, top_k, top_p, uniform)

    return sample


class _Decode(torch.nn.Module):
    def __init__(self, model: LlamaModel, kv_len: int):
        super().__init__()
        self.model, self.kv_len = model, kv_len

    def forward(self, tokens, positions, k_cache, v_cache):
        return self.model.decode(tokens, positions, k_cache, v_cache, self.kv_len)


def compile_decode(model: LlamaModel, batch: int, kv_len: int, path: Path) -> Path:
    """`LlamaModel.decode` at one batch size and KV length through torch.export + AOTInductor."""
    cache = model.new_kv_cache(batch)
    inputs = (torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long), cache.keys, cache.values)
    with torch.no_grad():
        exported = torch.export.export(_Decode(model, kv_len), inputs)
        return Path(
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path), inductor_configs=AOTI_CONFIG)
        )


def load_graph(model: LlamaModel, batch: int, kv_len: int, directory: Path):
    """One decode graph of `model`, compiled and loaded on the model's own weights; called as model.decode."""
    started = time.perf_counter()
    kernels = sorted(model.kernels - NOT_IN_DECODE_GRAPH)
    path = directory / f"decode_{'-'.join(kernels) or 'off'}_{batch}.pt2"
    package = torch._inductor.aoti_load_package(str(compile_decode(model, batch, kv_len, path)))
    state = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    package.load_constants(constants_map(package, state), check_full_update=True, user_managed=True)
    print(f"  compiled the decode graph with {kernels}, batch {batch}: {time.perf_counter() - started:.0f} s")
    return lambda tokens, positions, k_cache, v_cache, kv_len: package(tokens, positions, k_cache, v_cache)


def decode_steps(forward, sample, cache: KVCache, args) -> Callable[[], float]:
    """A closure that runs `args.steps` decode steps over `args.kv_len` positions and returns tokens/s."""
    batch, kv_len = cache.keys.shape[1], args.kv_len
    tokens = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(0))

    def run() -> float:
        started = time.perf_counter()
        for step in range(args.steps):
            # Positions advance as in real decoding, staying inside the kv_len bucket.
            positions = torch.full((batch,), kv_len // 2 + step % (kv_len // 2))
            logits, _, _ = forward(tokens, positions, cache.keys, cache.values, kv_len)
            sample(logits)
        return batch * args.steps / (time.perf_counter() - started)

    return run


def prefill_ms(model: LlamaModel, length: int) -> Callable[[], float]:
    tokens = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))

    def run() -> float:
        started = time.perf_counter()
        model.prefill(tokens, torch.tensor([length - 1]))
        return (time.perf_counter() - started) * 1e3

    return run


def build_cases(loaded, args, directory: Path) -> dict[tuple[str, str], Callable[[], float]]:
    """(configuration, column) -> a timed closure. One KV cache per batch size serves every
    configuration: the forwards only read it, and its contents do not change the work."""
    cases, graphs, caches = {}, {}, {}
    for name, kernels in configurations().items():
        model = model_from_state_dict(loaded.config, loaded.state_dict, MAX_SEQ_LEN, kernels=kernels)
        for batch in args.batches:
            cache = caches.setdefault(batch, model.new_kv_cache(batch))
            cases[name, f"eager b{batch}"] = decode_steps(model.decode, sampler(kernels, batch), cache, args)
            if args.aot:
                key = (kernels - NOT_IN_DECODE_GRAPH, batch)
                if key not in graphs:
                    graphs[key] = load_graph(model, batch, args.kv_len, directory)
                cases[name, f"aot b{batch}"] = decode_steps(graphs[key], sampler(kernels, batch), cache, args)
        cases[name, f"prefill {args.kv_len} ms"] = prefill_ms(model, args.kv_len)
    return cases


def measure(cases: dict, rounds: int) -> dict[tuple[str, str], float]:
    with torch.inference_mode():
        for run in cases.values():
            run()  # warm-up (allocator, first-call paths)
        samples = {case: [] for case in cases}
        for _ in range(rounds):
            for case, run in cases.items():
                samples[case].append(run())
    return {case: statistics.median(values) for case, values in samples.items()}


def print_table(results: dict[tuple[str, str], float]) -> None:
    names = list(dict.fromkeys(name for name, _ in results))
    columns = list(dict.fromkeys(column for _, column in results))
    print("| kernels | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name in names:
        cells = []
        for column in columns:
            value, base = results[name, column], results["off", column]
            # tokens/s: higher is better; prefill ms: lower is better. The ratio is the speedup either way.
            speedup = base / value if column.endswith("ms") else value / base
            cells.append(f"{value:.1f}" if name == "off" else f"{value:.1f} ({speedup:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--kv-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-aot", dest="aot", action="store_false")
    args = parser.parse_args()
    loaded = load_model_files("default")
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, kv_len {args.kv_len}, tokens/s (speedup vs off)")
    with tempfile.TemporaryDirectory() as directory:
        results = measure(build_cases(loaded, args, Path(directory)), args.rounds)
    print_table(results)


if __name__ == "__main__":
    main()
