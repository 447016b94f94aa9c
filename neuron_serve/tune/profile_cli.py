"""``neuron-serve profile ARTIFACTS``: the device profile of an artifact's graphs, for ``tune``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from neuron_serve.tune.device_profile import DeviceProfile, GraphProfile, from_neuron_summary
from neuron_serve.tune.neuron_profile import load_summary

# How a neuron graph is named (backends/neuron/calling_convention.graph_name): decode rows, prompt
# tokens, prompt rows and KV length. A graph with one prompt token is a decode-only step.
_NEURON_GRAPH = re.compile(r"^step_(\d+)x(\d+)x(\d+)x(\d+)$")


def add_profile_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile",
        help="profile an artifact's graphs on the traffic a server wrote (cpu: torch.profiler; neuron: neuron-profile)",
    )
    p.add_argument("artifacts", type=Path, help="a compiled artifact directory")
    p.add_argument("--traffic", type=Path, help="traffic-*.json to weigh the graphs by (default: each bucket once)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per graph (default 5)")
    p.add_argument(
        "--neuron-summaries",
        type=Path,
        help="a directory of `neuron-profile view --output-format summary-json` files, one per graph, "
        "named <graph>.json: read instead of profiling here",
    )
    p.add_argument("--out-dir", type=Path, default=Path("profiles"), help="writes <out-dir>/<name>/device-<time>.json")
    p.set_defaults(func=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    from neuron_serve.artifact.manifest import read_manifest
    from neuron_serve.tune.tune import read_profiles  # lazily: the CLI starts without torch

    traffic = read_profiles(args.traffic) if args.traffic else None
    if args.neuron_summaries:
        device = neuron_device_profile(args.neuron_summaries, read_manifest(args.artifacts).recipe.name)
    else:
        from neuron_serve.tune.cpu_capture import capture

        if args.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
        device = capture(args.artifacts, traffic, args.repeats)
    path = device.write(args.out_dir)
    print(f"Device profile of {args.artifacts} ({device.target}), limits: {_limits(device.limits)}")
    for graph in device.graphs:
        print(f"  {graph.name}: {graph.calls} calls x {graph.seconds_per_call * 1e3:.2f} ms; {_utilization(graph)}")
    for phase in ("decode", "prefill"):
        if summary := device.phase(phase):
            print(f"  {summary.describe()}")
    print(f"Wrote {path}")
    return 0


def neuron_device_profile(directory: Path, deployment: str) -> DeviceProfile:
    """The device profile of the summaries neuron-profile wrote for each graph (`<graph>.json`), each
    one execution: the phases weigh the graphs equally."""
    graphs = []
    for path in sorted(Path(directory).glob("*.json")):
        shape = _NEURON_GRAPH.match(path.stem)
        if not shape:
            raise ValueError(f"{path}: not named after a neuron graph (step_<rows>x<tokens>x<prompts>x<kv>.json)")
        phase = "decode" if int(shape[2]) == 1 else "prefill"
        (summary, *_) = load_summary(path)
        graphs.append(from_neuron_summary(path.stem, phase, 1, summary))
    if not graphs:
        raise ValueError(f"no neuron-profile summaries (<graph>.json) in {directory}")
    limits = {"name": "NeuronCore (MFU and MBU as neuron-profile measured them)"}
    return DeviceProfile(deployment, "neuron", limits, graphs)


def _limits(limits: dict) -> str:
    if "bytes_per_s" not in limits:
        return str(limits["name"])
    return f"{limits['name']}: {limits['bytes_per_s'] / 1e9:.1f} GB/s read, {limits['flops_per_s'] / 1e9:.0f} GFLOP/s"


def _utilization(graph: GraphProfile) -> str:
    if graph.mbu is None or graph.mfu is None:
        return "MBU/MFU not measured"
    return f"MBU {graph.mbu:.0%}, MFU {graph.mfu:.0%}"
