"""NeuronCore ranges as NEURON_RT_VISIBLE_CORES writes them: a single index ("3") or an inclusive range
("8-15"). A replica spans ``tp_degree`` consecutive NeuronCores; replicas never share a core (the runtime
reserves a core for the process that first claims it): `server/placement.py` assigns them.
"""

from __future__ import annotations


def core_range(first: int, count: int) -> str:
    """NEURON_RT_VISIBLE_CORES for `count` consecutive NeuronCores from `first`."""
    last = first + count - 1
    return str(first) if first == last else f"{first}-{last}"


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
