"""The feedback loop, for real, on the cpu target: serve, drive with skewed traffic, capture, tune,
recompile, and drive the tuned deployment with the same traffic, in one run.

    python -m benchmarks.tune_loop [--recipe compile/smollm2-135m-cpu.toml] [--concurrency 8]
                                   [--requests 96] [--slo ttft=S,itl=S] [--output bench-results/tune-loop]

Traffic: 85 % of the prompts near 100 tokens and 15 % near 900 (each within 10 %), 32 output tokens,
streaming ``/v1/completions`` through `neuron-serve bench` in a closed loop. The first server's traffic
profile (``POST /admin/traffic``) is copied to ``profiles/<name>/``, ``neuron-serve profile`` writes the
device profile of the graphs it ran beside it, and ``neuron-serve tune`` (with ``--slo`` when given)
writes the tuned recipe there too, as ``<name>-tuned.toml``; its compile reuses the cached weight shards.
Each server's padding comes from its own ``/metrics`` (the step graph's padded token slots: of its
prompt buckets, and of its decode rows) and from its own traffic profile (the KV positions past each
step's KV length, up to its recipe's KV bucket). The table is printed and written to
``--output/tune-loop.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.artifact.traffic import TrafficProfile
from neuron_serve.bench.tokenizer import load_tokenizer
from neuron_serve.bench.workload import corpus_token_ids, exact_length_text, load_corpus
from neuron_serve.compiler.compile import compile_recipe
from neuron_serve.recipe.files import dumps_recipe, load_recipe
from neuron_serve.tune.buckets import padding_of
from tests.server_handle import ServerHandle

SHORT, LONG, LONG_SHARE, OUTPUT_TOKENS = 100, 900, 0.15, 32


def skewed_dataset(tokenizer: Path, count: int, path: Path, seed: int = 0) -> None:
    """`count` prompts cut from the bench corpus at exact token lengths, as `bench --dataset` reads them."""
    tok, rng = load_tokenizer(str(tokenizer), "", ""), random.Random(seed)
    corpus = corpus_token_ids(tok, load_corpus())
    rows = []
    for _ in range(count):
        mean = LONG if rng.random() < LONG_SHARE else SHORT
        length = rng.randint(int(mean * 0.9), int(mean * 1.1))
        start = rng.randrange(len(corpus) - 2 * length)
        text, _ = exact_length_text(tok, corpus[start:], length)
        rows.append(json.dumps({"prompt": text, "output_len": OUTPUT_TOKENS}))
    path.write_text("\n".join(rows) + "\n")


def bucket_padding(server: ServerHandle) -> dict[str, tuple[float, float]]:
    """(real, padded) token slots of the step graph's prompt buckets and of its decode rows, from the
    server's /metrics."""
    text = requests.get(f"{server.base_url}/metrics", timeout=10).text
    totals = {part: {"real": 0.0, "padded": 0.0} for part in ("prompt", "decode")}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for kind in ("real", "padded"):
                if sample.name == f"neuron_serve:bucket_{kind}_tokens_total":
                    part = "prompt" if "prompt" in sample.labels["bucket"] else "decode"
                    totals[part][kind] += sample.value
    return {part: (t["real"], t["padded"]) for part, t in totals.items()}


def kv_padding(profile: Path, recipe) -> tuple[int, int]:
    """(real, padded) KV positions of the steps `profile` counted (each step's KV length at its
    histogram bin's bound, as `tune` counts them), in `recipe`'s KV buckets."""
    lengths = TrafficProfile.read(profile).histograms["engine_step_kv_length"].by_length()
    fit = padding_of(lengths, GraphSet.from_shapes(recipe.shapes).token_buckets)
    return fit.padded_tokens - fit.wasted_tokens, fit.padded_tokens


def run(artifacts: Path, dataset: Path, args: argparse.Namespace, label: str) -> dict:
    """Serve `artifacts`, drive them with `dataset`; the bench level, the padding and the profile."""
    server = ServerHandle(artifacts, ready_timeout=600)
    try:
        out = args.output / label
        command = [sys.executable, "-m", "neuron_serve.cli", "bench", "--base-url", server.base_url]
        command += ["--tokenizer", str(artifacts / "tokenizer"), "--dataset", str(dataset)]
        command += ["--concurrency", str(args.concurrency), "--num-prompts", str(args.requests)]
        subprocess.run([*command, "--output", str(out), "--no-progress"], check=True, stdout=subprocess.DEVNULL)
        level = json.loads((out / "results.json").read_text())["levels"][0]
        padding = bucket_padding(server)
        profile = Path(requests.post(f"{server.base_url}/admin/traffic", timeout=30).json()["path"])
    finally:
        server.stop()
    return {"level": level, "padding": padding, "profile": profile}


def tuned_recipe(recipe_path: Path, artifacts: Path, profile: Path, name: str, slo: str) -> Path:
    """Copy the profile to profiles/<name>/, profile the graphs it ran, and tune the recipe on both."""
    folder = Path("profiles") / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("traffic-*.json"), *folder.glob("device-*.json")]:
        old.unlink()
    shutil.copy2(profile, folder / profile.name)
    cli = [sys.executable, "-m", "neuron_serve.cli"]
    subprocess.run([*cli, "profile", str(artifacts), "--traffic", str(folder), "--out-dir", "profiles"], check=True)
    out = folder / f"{name}-tuned.toml"
    tune = [*cli, "tune", str(recipe_path), "--profiles", str(folder), "--out", str(out)]
    subprocess.run([*tune, *(["--slo", slo] if slo else [])], check=True)
    tuned = load_recipe(out)
    tuned.name = f"{name}-tuned"  # its own artifacts, beside the original's
    out.write_text(dumps_recipe(tuned, comment=f"Tuned from {recipe_path} by `neuron-serve tune` on {profile.name}."))
    return out


def _share(real: float, padded: float) -> str:
    return f"{1 - real / padded:.1%}" if padded else "–"


def table(recipes: list, results: list[dict]) -> str:
    lines = [
        "| recipe | slots | token budget | prefill order | context buckets | KV buckets | batch buckets "
        "| padding: prompt tokens | decode rows | KV positions | TTFT p50 ms | TTFT p90 ms | ITL p50 ms "
        "| output tok/s |",
        "|" + " --- |" * 14,
    ]
    for recipe, r in zip(recipes, results, strict=True):
        s, level, padding = recipe.shapes, r["level"], r["padding"]
        lines.append(
            f"| {recipe.name} | {s.batch_size} | {s.token_budget} | {recipe.serve.prefill_order} "
            f"| {s.context_buckets} | {s.token_buckets} | {s.batch_buckets} | {_share(*padding['prompt'])} "
            f"| {_share(*padding['decode'])} | {_share(*kv_padding(r['profile'], recipe))} "
            f"| {level['median_ttft_ms']:.0f} | {level['p90_ttft_ms']:.0f} | {level['median_itl_ms']:.1f} "
            f"| {level['output_throughput']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("compile/smollm2-135m-cpu.toml"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--slo", default="", help="tune's latency objectives, e.g. ttft=2,itl=0.5 (default: none)")
    parser.add_argument("--output", type=Path, default=Path("bench-results/tune-loop"))
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe)
    artifacts = compile_recipe(recipe).out_dir
    dataset = args.output / "skewed.jsonl"
    skewed_dataset(artifacts / "tokenizer", args.requests, dataset)
    before = run(artifacts, dataset, args, "before")
    tuned_path = tuned_recipe(args.recipe, artifacts, before["profile"], recipe.name, args.slo)
    tuned = load_recipe(tuned_path)
    after = run(compile_recipe(tuned).out_dir, dataset, args, "after")
    report = table([recipe, tuned], [before, after])
    (args.output / "tune-loop.md").write_text(report)
    print(report)
    print(f"written: {args.output / 'tune-loop.md'}, {tuned_path}")


if __name__ == "__main__":
    main()
