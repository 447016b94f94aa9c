"""Decode throughput of the default model against this machine's roofline (eager PyTorch, fp32).

    python -m benchmarks.decode [--batches 1,8,16,32] [--steps 32] [--kv-len 256] [--baseline] [--breakdown]
                                [--quantization none,int8-weight,...]

Batch 1 is bound by memory bandwidth (every weight byte is read once per token); large batches by matmul
FLOP/s (2 x parameters x batch per step). With `--quantization`, each method's model (the layers `--skip`
names kept in fp32) is measured against its own bandwidth bound: the bytes its linear layers store (int8
or int4 codes, scales, the fp32 layers it skips) over the measured read bandwidth. `--baseline` also
times Hugging Face `generate()` at batch 1 in the same process. `--breakdown` shows where the largest
batch's decode step goes: the weight matmuls (and the rate at which they stream the weights), attention
over the KV cache, the other operators, and what the profiler does not see (Python and dispatch between
operators). It then prints the ceiling of this machine's BLAS: the step's weight matmuls run alone, back
to back, plus the KV cache read at full bandwidth, as a fraction of the compute bound; no eager step can
beat it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from neuron_serve.backends.base import run_decode
from neuron_serve.backends.registry import open_runner
from neuron_serve.model.quantization import QuantizedLinear, QuantSpec
from neuron_serve.model.state import model_from_state_dict
from neuron_serve.tune.host_limits import matmul_flops, memory_read_bandwidth
from neuron_serve.weights.loader import build_model, load_model_files


def decode_tokens_per_s(model, batch: int, steps: int, kv_len: int) -> float:
    cache = model.new_kv_cache(batch)
    k_cache, v_cache = cache.keys, cache.values
    tokens = torch.randint(0, model.config.vocab_size, (batch,))
    with torch.inference_mode():
        for _ in range(3):
            model.decode(tokens, torch.full((batch,), kv_len // 2), k_cache, v_cache, kv_len)
        start = time.perf_counter()
        for step in range(steps):
            # Positions advance as in real decoding, staying inside the kv_len bucket.
            positions = torch.full((batch,), kv_len // 2 + step % (kv_len // 2))
            model.decode(tokens, positions, k_cache, v_cache, kv_len)
        return batch * steps / (time.perf_counter() - start)


WEIGHT_MATMULS = {"aten::mm", "aten::addmm"}  # nn.Linear; attention's q.k and p.v are aten::bmm
ATTENTION = {"aten::bmm", "aten::_softmax"}


def print_breakdown(model, batch: int, kv_len: int, weight_bytes: int, steps: int = 8) -> float:
    """Prints where a decode step goes; returns the bytes of KV cache it reads."""
    cache = model.new_kv_cache(batch)
    k_cache, v_cache = cache.keys, cache.values
    tokens = torch.randint(0, model.config.vocab_size, (batch,))
    positions = torch.full((batch,), kv_len // 2)
    with torch.inference_mode():
        model.decode(tokens, positions, k_cache, v_cache, kv_len)
        start = time.perf_counter()
        for _ in range(steps):
            model.decode(tokens, positions, k_cache, v_cache, kv_len)
        wall = (time.perf_counter() - start) / steps
        with torch.profiler.profile() as profile:
            for _ in range(steps):
                model.decode(tokens, positions, k_cache, v_cache, kv_len)
    seconds = {"weight matmuls": 0.0, "attention": 0.0, "other operators": 0.0}
    for event in profile.key_averages():
        kind = (
            "weight matmuls"
            if event.key in WEIGHT_MATMULS
            else "attention"
            if event.key in ATTENTION
            else "other operators"
        )
        seconds[kind] += event.self_cpu_time_total / 1e6 / steps
    seconds["between operators"] = max(0.0, wall - sum(seconds.values()))
    kv_bytes = 2 * k_cache[:, :, :, :kv_len].numel() * k_cache.element_size()
    print(f"batch {batch} decode step at kv length {kv_len}: {wall * 1e3:.1f} ms")
    for kind, spent in seconds.items():
        print(f"  {kind:<18} {spent * 1e3:6.1f} ms")
    weight_rate = weight_bytes / seconds["weight matmuls"] / 1e9
    kv_rate = kv_bytes / seconds["attention"] / 1e9
    print(
        f"  the weight matmuls stream {weight_bytes / 1e6:.0f} MB at {weight_rate:.1f} GB/s; "
        f"attention reads {kv_bytes / 1e6:.0f} MB of KV cache at {kv_rate:.1f} GB/s"
    )
    return kv_bytes


def matmuls_seconds(linears: list[torch.nn.Linear], batch: int, repeats: int = 5) -> float:
    """`linears` called back to back on a batch of inputs, nothing between them; the best of `repeats`."""
    inputs = {n: torch.randn(batch, n) for n in {linear.in_features for linear in linears}}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for linear in linears:
                linear(inputs[linear.in_features])
            best = min(best, time.perf_counter() - start)
    return best


def print_ceiling(model, batch: int, kv_bytes: float, bandwidth: float, flops: float) -> None:
    """The best step this machine's BLAS allows: the weights are far larger than the caches, so the
    step's matmuls run alone stream them from memory as a real step does; the KV cache is read at full
    bandwidth; everything else is free. Layer 0's matmuls repeated (its weights stay in cache) show
    the BLAS's FLOP/s at this batch with no memory traffic at all."""
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    weight_bytes = sum(linear.weight.numel() * linear.weight.element_size() for linear in linears)
    matmuls = matmuls_seconds(linears, batch)
    kv_read = kv_bytes / bandwidth
    rate = batch / (matmuls + kv_read)
    bound = flops / (2 * sum(p.numel() for p in model.parameters()))  # tokens/s, at any batch
    layer = [module for module in model.layers[0].modules() if isinstance(module, torch.nn.Linear)]
    hot = matmuls_seconds(layer * 8, batch) / 8
    hot_flops = 2 * batch * sum(linear.weight.numel() for linear in layer) / hot
    print(
        f"ceiling at batch {batch}: the weight matmuls alone take {matmuls * 1e3:.1f} ms "
        f"({weight_bytes / matmuls / 1e9:.1f} GB/s of weights); reading the KV cache at the full "
        f"{bandwidth / 1e9:.1f} GB/s takes {kv_read * 1e3:.1f} ms. With every other operator free a step "
        f"would take {(matmuls + kv_read) * 1e3:.1f} ms: {rate:.0f} tokens/s, {rate / bound:.0%} of the compute bound"
    )
    print(
        f"  with its weights in cache, a layer's matmuls at batch {batch} run at {hot_flops / 1e9:.0f} GFLOP/s: "
        f"{hot_flops / flops:.0%} of the square-matmul FLOP/s"
    )


def hf_generate_tokens_per_s(loaded, new_tokens: int = 64) -> float:
    from tests.hf_reference import hf_model

    model = hf_model(loaded.config, loaded.state_dict)
    prompt = torch.tensor([loaded.tokenizer.encode("The history of Rome")])
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start)


def compiled_tokens_per_s(runner, batch: int, steps: int, kv_len: int) -> float:
    """Decode steps of an artifact's runner (the served path: the compiled step graph), as `decode_tokens_per_s`."""
    slots, tokens = list(range(batch)), [1] * batch
    for _ in range(3):
        run_decode(runner, slots, tokens, [kv_len // 2] * batch)
    start = time.perf_counter()
    for step in range(steps):
        run_decode(runner, slots, tokens, [kv_len // 2 + step % (kv_len // 2)] * batch)
    return batch * steps / (time.perf_counter() - start)


def print_compiled(directory: Path, batches: list[int], steps: int, kv_len: int, limits: tuple[float, float, int]):
    """`limits`: read bandwidth, matmul FLOP/s and the model's parameter count."""
    bandwidth, flops, params = limits
    runner, manifest = open_runner(directory)
    shard = load_file(directory / manifest.weights[0])
    spec = QuantSpec.of(manifest.recipe.quantization)
    model = model_from_state_dict(manifest.model_config, shard, kv_len, quantization=spec)
    read = weight_bytes_read(model)
    print(f"\n{directory} (compiled step graph, {spec.method}): {read / 1e6:.0f} MB of weights read per decode step")
    print(f"{'batch':>5} {'tokens/s':>9} {'bound':>9} {'of bound':>9}  bound is")
    for batch in batches:
        rate = compiled_tokens_per_s(runner, batch, steps, kv_len)
        bound, kind = min((bandwidth / read * batch, "bandwidth"), (flops / (2 * params), "compute"))
        print(f"{batch:>5} {rate:>9.1f} {bound:>9.1f} {rate / bound:>8.0%}  {kind}")


def weight_bytes_read(model) -> int:
    """Bytes a decode step reads from its linear layers' stored tensors (the embeddings are a gather)."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, QuantizedLinear))]
    return sum(t.numel() * t.element_size() for m in layers for t in [*m.parameters(), *m.buffers()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,16,32")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--kv-len", type=int, default=256)
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--quantization", default="none", help="comma-separated methods (model/quantization.py)")
    parser.add_argument("--skip", default="embed_tokens,lm_head", help="layers kept in fp32 by every method")
    parser.add_argument("--artifacts", type=Path, help="also time this artifact's compiled step graph")
    args = parser.parse_args()

    bandwidth, flops = memory_read_bandwidth(), matmul_flops()
    loaded = load_model_files("default")
    model = build_model(loaded, max_seq_len=2048)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = params * 4
    print(
        f"machine: {torch.get_num_threads()} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s, "
        f"fp32 matmul {flops / 1e9:.0f} GFLOP/s"
    )
    print(f"model: {params / 1e6:.1f} M parameters, {weight_bytes / 1e6:.0f} MB of fp32 weights read per decode step")
    skip = tuple(args.skip.split(","))
    for method in args.quantization.split(","):
        quantized = model if method == "none" else build_model(loaded, 2048, QuantSpec(method, skip=skip))
        read = weight_bytes_read(quantized)
        print(f"\n{method}: {read / 1e6:.0f} MB of weights read per decode step")
        print(f"{'batch':>5} {'tokens/s':>9} {'bound':>9} {'of bound':>9}  bound is")
        for batch in (int(b) for b in args.batches.split(",")):
            rate = decode_tokens_per_s(quantized, batch, args.steps, args.kv_len)
            bandwidth_bound = bandwidth / read * batch
            compute_bound = flops / (2 * params)
            bound, kind = min((bandwidth_bound, "bandwidth"), (compute_bound, "compute"))
            print(f"{batch:>5} {rate:>9.1f} {bound:>9.1f} {rate / bound:>8.0%}  {kind}")
    if args.artifacts:
        batches = [int(b) for b in args.batches.split(",")]
        print_compiled(args.artifacts, batches, args.steps, args.kv_len, (bandwidth, flops, params))
    if args.breakdown:
        batch = max(int(b) for b in args.batches.split(","))
        kv_bytes = print_breakdown(model, batch, args.kv_len, weight_bytes)
        print_ceiling(model, batch, kv_bytes, bandwidth, flops)
    if args.baseline:
        print(f"baseline: Hugging Face generate() at batch 1: {hf_generate_tokens_per_s(loaded):.1f} tokens/s")


if __name__ == "__main__":
    main()
