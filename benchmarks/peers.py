"""neuron-serve against llama.cpp's llama-server: the same model, the same machine, the same client, one run.

    python -m benchmarks.peers [--recipe compile/smollm2-135m-cpu.toml] [--concurrency 1,8,32]
                               [--output bench-results/peers] [--threads N]

llama-server is built once from the llama-cpp-python source distribution on the package index (its
vendored llama.cpp, CMake, about 15 minutes on 2 cores) and cached in
``$NEURON_SERVE_CACHE/llama-server/<version>/``. It serves the GGUF that the recipe's model source
resolves to (`-np 32 -c 16384`, one thread per core). neuron-serve serves the recipe (compiled first, a
cache hit when nothing changed). The servers run one after the other, never together, and
`neuron-serve bench` drives both the same way: streaming ``/v1/completions`` with ``ignore_eos``, 64
prompt and 64 output tokens at each concurrency (2 x concurrency requests), then the ``qa`` preset
(256 -> 128) at the largest concurrency. The table (printed, and written as Markdown and a PNG under
``--output``) puts each figure beside llama-server's, the machine's measured limits, and the ceiling
this machine's BLAS (or the recipe's quantization kernels) sets on the throughput of the model's
matmuls in the recipe's dtype (`matmul_ceiling`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import matplotlib
import requests
import torch

from neuron_serve.artifact.manifest import read_manifest
from neuron_serve.compiler.compile import compile_recipe
from neuron_serve.model.config import ModelConfig
from neuron_serve.model.linear import Linear
from neuron_serve.model.quantization import QuantizedLinear, QuantSpec, linear_group, quantize_weight
from neuron_serve.recipe.files import load_recipe
from neuron_serve.tune.host_limits import matmul_flops, memory_read_bandwidth
from neuron_serve.weights.local_cache import cache_dir
from neuron_serve.weights.sources import resolve_source
from tests.server_handle import ServerHandle

LLAMA_CPP_PYTHON = "0.3.36"
CMAKE_FLAGS = [
    "-DLLAMA_BUILD_SERVER=ON",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary to cache
    # Without llama.cpp's AMX kernels: on the KVM Sapphire Rapids guests we develop on, the first batched
    # Q4_1 matmul dies with SIGILL on `tilezero` (tinygemm_kernel_amx, ggml-cpu/amx/mmq.cpp, 0.3.36),
    # although the tiles are granted (oneDNN's AMX runs in the same guest). It serves from its AVX-512
    # VNNI kernels instead. A no-op on CPUs without AMX.
    "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
]
BUILD = f"{LLAMA_CPP_PYTHON}-no-amx"  # the cache's name for this build


def llama_server_binary() -> Path:
    """The cached llama-server, built first when missing."""
    binary = cache_dir() / "llama-server" / BUILD / "llama-server"
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(work)]
        subprocess.run([*pip, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
        with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as sdist:
            sdist.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = work / "build"
        print(f"building llama-server {LLAMA_CPP_PYTHON} (about 15 minutes on 2 cores)", file=sys.stderr)
        subprocess.run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_FLAGS], check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], check=True)
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", binary)
    return binary


class LlamaServer:
    """llama-server on a free loopback port, as the issue's measurement ran it."""

    def __init__(self, binary: Path, gguf: Path, threads: int, log: Path):
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["-np", "32", "-c", "16384", "-t", str(threads)]
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if requests.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server did not start; see {log}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_level(base_url: str, tokenizer: Path, workload: list[str], concurrency: int, out: Path) -> dict:
    """One closed-loop level of `neuron-serve bench`, 2 x concurrency requests; its results."""
    command = [sys.executable, "-m", "neuron_serve.cli", "bench", "--base-url", base_url]
    command += ["--tokenizer", str(tokenizer), *workload, "--concurrency", str(concurrency)]
    command += ["--num-prompts", str(2 * concurrency), "--output", str(out), "--no-progress"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())["levels"][0]


LENGTHS = {"64 -> 64": (64, 64), "qa 256 -> 128": (256, 128)}


def workloads(concurrency: list[int]) -> list[tuple[str, list[str], int]]:
    chat = ["--input-len", "64", "--output-len", "64"]
    return [("64 -> 64", chat, c) for c in concurrency] + [("qa 256 -> 128", ["--preset", "qa"], max(concurrency))]


def measure(name: str, base_url: str, tokenizer: Path, concurrency: list[int], out: Path) -> list[dict]:
    results = []
    for label, workload, level in workloads(concurrency):
        print(f"{name}: {label} at concurrency {level}", file=sys.stderr)
        results.append(bench_level(base_url, tokenizer, workload, level, out / f"{name}-{label[:2]}-{level}"))
    return results


ROW = (
    "| {} | {} | {:.1f} | {:.1f} | {:.2f}x | {:.0f} ({:.2f}x) | {:.2f} | {:.2f} | {:.2f}x | {:.0f} | {:.0f} | {:.0f} |"
)
HEADER = (
    "| workload | concurrency | neuron-serve tok/s | llama-server tok/s | ratio | matmul ceiling tok/s "
    "| neuron-serve TTFT p50 s | llama-server TTFT p50 s | TTFT ratio | neuron-serve ITL p50 ms "
    "| llama-server ITL p50 ms | neuron-serve ITL p99 ms |\n|" + " --- |" * 12
)


def table(ours: list[dict], theirs: list[dict], ceilings: list[float], concurrency: list[int], limits: str) -> str:
    lines = [limits, "", HEADER]
    rows = zip(workloads(concurrency), ours, theirs, ceilings, strict=True)
    for (label, _, level), a, b, ceiling in rows:
        tput_a, tput_b = a["output_throughput"], b["output_throughput"]
        ttft_a, ttft_b = a["median_ttft_ms"] / 1e3, b["median_ttft_ms"] / 1e3
        values = (tput_a, tput_b, tput_a / tput_b, ceiling, ceiling / tput_b, ttft_a, ttft_b, ttft_a / ttft_b)
        lines.append(ROW.format(label, level, *values, a["median_itl_ms"], b["median_itl_ms"], a["p99_itl_ms"]))
    return "\n".join(lines) + "\n"


def layer_groups(config: ModelConfig) -> list[list[tuple[str, int, int]]]:
    """(name, out, in) of every linear layer a token goes through, lm_head excluded, in the groups that
    share an input (and a kernel call, `quantization.linear_group`)."""
    hd, h, inter = config.head_dim, config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    layer = [
        [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h)],
        [("o_proj", h, q)],
        [("gate_proj", inter, h), ("up_proj", inter, h)],
        [("down_proj", h, inter)],
    ]
    return layer * config.num_hidden_layers


def served_layer(name: str, n_out: int, n_in: int, dtype: torch.dtype, spec: QuantSpec) -> torch.nn.Module:
    """A random layer of this shape as the served model holds it: `Linear`, or quantized by `spec`."""
    layer = Linear(n_in, n_out, bias=False, dtype=dtype)
    if not spec.quantizes(name):
        return layer
    quantized = QuantizedLinear(n_in, n_out, spec, False, dtype)
    for suffix, tensor in quantize_weight(layer.weight.detach(), spec).items():
        setattr(quantized, suffix, tensor)
    return quantized


def matmul_ceiling(
    config: ModelConfig, dtype: torch.dtype, spec: QuantSpec, concurrency: int, input_len: int, output_len: int
) -> float:
    """Output tokens/s if a server did nothing but the matmuls of its steps, computed as the served model
    computes them (`model.linear.Linear`, or the quantization's kernels, grouped), at this machine's rate
    for their row count: in a steady closed loop every step decodes `concurrency` tokens and carries
    their share of the prompts, concurrency x input_len / output_len tokens, and lm_head runs on the
    decode rows. Attention, sampling and HTTP cost nothing here, so no server reaches it."""
    rows = concurrency + round(concurrency * input_len / output_len)
    with torch.no_grad():
        groups = [tuple(served_layer(*shape, dtype, spec) for shape in group) for group in layer_groups(config)]
        lm_head = served_layer("lm_head", config.vocab_size, config.hidden_size, dtype, spec)
        inputs = {size: torch.randn(rows, size, dtype=dtype) for size in (config.hidden_size, config.intermediate_size)}
        decode_rows = torch.randn(concurrency, config.hidden_size, dtype=dtype)

        def step() -> None:
            for group in groups:
                linear_group(inputs[group[0].in_features], group)
            lm_head(decode_rows)

        step()
        started = time.perf_counter()
        for _ in range(3):
            step()
    return concurrency / ((time.perf_counter() - started) / 3)


def plot(ours: list[dict], theirs: list[dict], concurrency: list[int], path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{label}\nc={level}" for label, _, level in workloads(concurrency)]
    xs = range(len(labels))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([x - 0.2 for x in xs], [r["output_throughput"] for r in ours], 0.4, label="neuron-serve")
    ax.bar([x + 0.2 for x in xs], [r["output_throughput"] for r in theirs], 0.4, label="llama-server")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("output tokens/s")
    ax.set_title("Same model, machine and client")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_limits() -> str:
    bandwidth, fp32 = memory_read_bandwidth(), matmul_flops(dtype=torch.float32)
    # 1024², not 2048²: where bf16 is emulated one 2048² product takes about 15 s.
    bf16 = matmul_flops(1024, dtype=torch.bfloat16, repeats=2)
    return (
        f"Machine: {torch.get_num_threads()} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s, "
        f"fp32 matmul {fp32 / 1e9:.0f} GFLOP/s, bf16 matmul {bf16 / 1e9:.0f} GFLOP/s."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="compile/smollm2-135m-cpu.toml")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--output", type=Path, default=Path("bench-results/peers"))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    args.output.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe)
    gguf = resolve_source(recipe.model.source)
    if gguf.suffix != ".gguf":
        raise SystemExit(f"llama-server needs a GGUF model; {args.recipe} loads {gguf}")
    artifacts = compile_recipe(recipe).out_dir
    tokenizer = artifacts / "tokenizer"
    binary = llama_server_binary()
    limits = machine_limits()

    llama = LlamaServer(binary, gguf, args.threads, args.output / "llama-server.log")
    try:
        theirs = measure("llama-server", llama.base_url, tokenizer, concurrency, args.output)
    finally:
        llama.stop()
    server = ServerHandle(artifacts, ready_timeout=300)
    try:
        ours = measure("neuron-serve", server.base_url, tokenizer, concurrency, args.output)
    finally:
        server.stop()

    manifest = read_manifest(artifacts)
    config, dtype = manifest.model_config, manifest.recipe.model.torch_dtype
    spec = QuantSpec.of(manifest.recipe.quantization)
    ceilings = [
        matmul_ceiling(config, dtype, spec, level, *LENGTHS[label]) for label, _, level in workloads(concurrency)
    ]
    report = table(ours, theirs, ceilings, concurrency, limits)
    (args.output / "peers.md").write_text(report)
    plot(ours, theirs, concurrency, args.output / "peers.png")
    print(report)
    print(f"written: {args.output / 'peers.md'}, {args.output / 'peers.png'}")


if __name__ == "__main__":
    main()
