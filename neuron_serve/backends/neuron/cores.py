"""NeuronCore assignment: which cores each replica (one gunicorn worker) may use.

A replica spans ``tp_degree`` consecutive NeuronCores; replicas never share a core (the runtime
reserves a core for the process that first claims it). Values are NEURON_RT_VISIBLE_CORES strings:
a single index ("3") or an inclusive range ("8-15").
"""

from __future__ import annotations

from neuron_serve.recipe.instances import get_instance


def _replicas(instance: str, tp_degree: int, replicas: int | None) -> tuple[int, int]:
    cores = get_instance(instance).neuron_cores
    if tp_degree < 1:
        raise ValueError(f"tp_degree must be >= 1, got {tp_degree}")
    if replicas is None:
        replicas = cores // tp_degree
    if replicas < 1 or replicas * tp_degree > cores:
        raise ValueError(
            f"{replicas} replicas x tp_degree {tp_degree} = {replicas * tp_degree} NeuronCores, "
            f"but {instance} has {cores}"
        )
    return replicas, cores


def visible_core_ranges(instance: str, tp_degree: int, replicas: int | None = None) -> list[str]:
    """NEURON_RT_VISIBLE_CORES per replica; ``replicas`` defaults to as many as fit."""
    replicas, _ = _replicas(instance, tp_degree, replicas)
    ranges = []
    for i in range(replicas):
        first, last = i * tp_degree, (i + 1) * tp_degree - 1
        ranges.append(str(first) if first == last else f"{first}-{last}")
    return ranges


def core_range_for_worker(worker_index: int, instance: str, tp_degree: int, replicas: int | None = None) -> str:
    """NEURON_RT_VISIBLE_CORES for the worker with this 0-based index."""
    ranges = visible_core_ranges(instance, tp_degree, replicas)
    if not 0 <= worker_index < len(ranges):
        raise ValueError(
            f"worker {worker_index} has no NeuronCores: {instance} at tp_degree {tp_degree} "
            f"holds {len(ranges)} replicas (workers 0..{len(ranges) - 1})"
        )
    return ranges[worker_index]


def visible_core_count(visible: str) -> int:
    """How many NeuronCores a NEURON_RT_VISIBLE_CORES value names ("3": one, "8-15": eight)."""
    first, _, last = visible.strip().partition("-")
    try:
        count = int(last or first) - int(first) + 1
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"NEURON_RT_VISIBLE_CORES={visible!r}: expected one core index or a range like 8-15")
    return count
