"""Which cores each replica of each served model may use. Every worker holds one replica of every
model; the models' replicas sit side by side on the host's cores and never share one (on Neuron the
runtime reserves a core for its first process; on the CPU, shared cores would slow both). A set of
models that does not fit is refused before any worker starts, naming what each needs."""

from __future__ import annotations

from neuron_serve.backends.base import Cores
from neuron_serve.backends.registry import backend_for
from neuron_serve.recipe.schema import Recipe


def plan_placement(models: dict[str, Recipe], replicas: int) -> dict[str, list[Cores]]:
    """Each model's cores per replica (index = worker's replica index)."""
    kinds = sorted({recipe.target.kind for recipe in models.values()})
    if len(kinds) > 1:
        raise ValueError(f"the models target {' and '.join(kinds)}: one server serves models of one target kind")
    backend = backend_for(kinds[0])
    available = min(backend.cores(recipe) for recipe in models.values())
    share = max(1, available // (replicas * len(models)))
    sizes = {name: backend.replica_cores(recipe, share) for name, recipe in models.items()}
    needed = replicas * sum(sizes.values())
    if needed > available:
        each = ", ".join(f"{name} {replicas} x {size}" for name, size in sizes.items())
        raise ValueError(
            f"the models do not fit: {replicas} replica(s) of each ({each}) take {needed} {backend.core_name}, "
            f"and this host has {available}"
        )
    plan, first = {}, 0
    for name, size in sizes.items():
        plan[name] = [Cores(first + i * size, size) for i in range(replicas)]
        first += replicas * size
    return plan
