"""The device profile of a cpu artifact: each graph the traffic ran, timed under ``torch.profiler`` in this process.

The forward process of a live server serves one call at a time from the engine, so its graphs are
profiled here instead, on the same artifact and at the same shapes: each graph use the traffic
profile counted (``step_decode_RxL``: R decode rows attending L keys; ``step_prompt_P``: a P-token
prompt chunk), or, without traffic, one decode and one prompt step per bucket. A step that mixed
decodes and a prompt chunk is profiled as its two parts, each weighed by how often the traffic ran it.

AOTInductor's generated kernels appear in the profiler only in a build of the graph with a profiler
scope around each (``backends/cpu/export.py``), and those scopes slow a step by 7-14 %. So each graph
is timed on the artifact's own build, and its time is split by family in the same proportions as one
call of the profiling build (compiled once, and cached, on the first `profile` of an artifact). Time
outside every operator and kernel, the runner's Python and the graph's wrapper code, is its own family.

What a call reads: the weights once (less the embedding table, of which it gathers a row per token)
and each row's keys and values up to the KV bucket. What it computes: 2 FLOPs per linear weight per
token, and 4 per head dimension per token per key for attention's two matmuls.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, record_function

from neuron_serve.artifact.graphs import STEP
from neuron_serve.artifact.manifest import ArtifactManifest, read_manifest
from neuron_serve.artifact.traffic import TrafficProfile
from neuron_serve.backends.base import LoadTimes, Runner, warm_up
from neuron_serve.backends.registry import backend_for, open_runner
from neuron_serve.model.step import PromptChunk, StepBatch
from neuron_serve.tune.device_profile import DeviceProfile, GraphProfile, family_of
from neuron_serve.tune.host_limits import measure_host
from neuron_serve.tune.plan import ModelFacts, PlanRequest, Roofline, model_facts

_DECODE = re.compile(rf"^{STEP}_decode_(\d+)x(\d+)$")
_PROMPT = re.compile(rf"^{STEP}_prompt_(\d+)$")


@dataclass(frozen=True)
class GraphCall:
    """A graph to profile: its traffic name, phase, how often the traffic ran it and a step that runs it."""

    name: str
    phase: str
    calls: int
    batch: StepBatch
    tokens: int  # tokens the call computes: decode rows, or the prompt chunk's
    keys: int  # keys each token attends: the KV bucket
    kv_rows: int  # sequences whose cache the call reads


def graph_calls(runner: Runner, traffic: TrafficProfile | None) -> list[GraphCall]:
    """The calls the traffic ran (by their names), or one per decode and prompt bucket without traffic."""
    graphs = runner.graphs
    if traffic is None:
        names = {f"{STEP}_decode_{graphs.batch_buckets[-1]}x{kv}": (1, 1) for kv in graphs.token_buckets}
        names |= {f"{STEP}_prompt_{tokens}": (1, 1) for tokens in graphs.context_buckets}
    else:
        names = traffic.graphs
    calls = []
    for name, (_, padded) in sorted(names.items()):
        if decode := _DECODE.match(name):
            rows, kv = int(decode[1]), int(decode[2])
            batch = StepBatch(list(range(rows)), [0] * rows, [kv - 1] * rows)
            calls.append(GraphCall(name, "decode", max(1, padded // rows), batch, rows, kv, rows))
        elif prompt := _PROMPT.match(name):
            tokens = int(prompt[1])
            kv = next(b for b in graphs.token_buckets if b >= tokens)
            batch = StepBatch(chunks=[PromptChunk(0, 0, [0] * tokens)])
            calls.append(GraphCall(name, "prefill", max(1, padded // tokens), batch, tokens, kv, 1))
    return calls


def _families(prof: profile, wall: float) -> dict[str, float]:
    """Self time by family (seconds); what no operator or kernel accounts for is outside kernels."""
    families: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("graph:"):
            continue
        family = family_of(event.key)
        families[family] = families.get(family, 0.0) + event.self_cpu_time_total / 1e6
    families["outside kernels"] = max(0.0, wall - sum(families.values()))
    return families


def profile_call(runner: Runner, profiled: Runner, call: GraphCall, repeats: int) -> tuple[float, dict[str, float]]:
    """(median seconds per call on `runner`, that time by family): split in the proportions of one
    call of `profiled`, the build that shows its kernels, under the profiler."""
    runner.step(call.batch)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.step(call.batch)
        times.append(time.perf_counter() - started)
    profiled.step(call.batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        with record_function(f"graph:{call.name}"):
            profiled.step(call.batch)
        wall = time.perf_counter() - started
    median = statistics.median(times)
    return median, {family: seconds * median / wall for family, seconds in _families(prof, wall).items()}


def call_costs(call: GraphCall, facts: ModelFacts, manifest: ArtifactManifest) -> tuple[float, float]:
    """(bytes read, FLOPs) of one call, as the module docstring counts them."""
    config = manifest.model_config
    reads = facts.weight_bytes - facts.gathered_bytes + call.kv_rows * call.keys * facts.kv_bytes_per_token
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * call.keys
    return float(reads), float(call.tokens * (2 * facts.matmul_params + attention))


def capture(
    directory: Path, traffic: TrafficProfile | None, repeats: int = 5, limits: Roofline | None = None
) -> DeviceProfile:
    """Profile an artifact's graphs on this host; `limits` default to this host's, measured now."""
    manifest = read_manifest(directory)
    profiled = backend_for(manifest.recipe.target.kind).profiling_runner(Path(directory), manifest)
    runner, manifest = open_runner(Path(directory), LoadTimes())
    try:
        recipe = manifest.recipe
        limits = limits or measure_host(recipe.model.torch_dtype)
        request = PlanRequest(recipe.model.dtype, recipe.quantization.method, recipe.shapes.max_seq_len)
        facts = model_facts(recipe, manifest.model_config, request)
        warm_up(runner, every_graph=False)
        warm_up(profiled, every_graph=False)
        graphs = []
        for call in graph_calls(runner, traffic):
            seconds, families = profile_call(runner, profiled, call, repeats)
            reads, flops = call_costs(call, facts, manifest)
            mbu, mfu = reads / seconds / limits.bytes_per_s, flops / seconds / limits.flops_per_s
            graphs.append(GraphProfile(call.name, call.phase, call.calls, seconds, families, reads, flops, mbu, mfu))
    finally:
        runner.close()
        profiled.close()
    deployment = traffic.deployment if traffic else recipe.name
    described = {"name": limits.name, "bytes_per_s": limits.bytes_per_s, "flops_per_s": limits.flops_per_s}
    return DeviceProfile(deployment, recipe.target.kind, described, graphs)
