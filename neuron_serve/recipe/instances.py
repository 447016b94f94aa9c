"""Inf2 and Trn1 instance catalog: NeuronCores, accelerator memory and on-demand price.

Prices are AWS on-demand Linux rates in us-east-1 as published on the EC2 pricing page in 2025;
they drift and differ by region, so every consumer lets the user override them
(``load_price_overrides``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

# TP degrees that neuronx-distributed supports per accelerator family (NeuronCores per model replica).
ALLOWED_TP_DEGREES = {"inf2": (1, 2, 4, 8, 24), "trn1": (1, 2, 8, 16, 32)}
PRICE_SOURCE = "AWS EC2 on-demand pricing, Linux, us-east-1, as published in 2025"


@dataclass(frozen=True)
class Instance:
    name: str
    family: str
    neuron_cores: int
    accelerator_memory_gib: int
    usd_per_hour: float


INSTANCES: dict[str, Instance] = {
    i.name: i
    for i in (
        Instance("inf2.xlarge", "inf2", 2, 32, 0.7582),
        Instance("inf2.8xlarge", "inf2", 2, 32, 1.9679),
        Instance("inf2.24xlarge", "inf2", 12, 192, 6.4906),
        Instance("inf2.48xlarge", "inf2", 24, 384, 12.9813),
        Instance("trn1.2xlarge", "trn1", 2, 32, 1.3438),
        Instance("trn1.32xlarge", "trn1", 32, 512, 21.50),
    )
}


def get_instance(name: str) -> Instance:
    try:
        return INSTANCES[name]
    except KeyError:
        known = ", ".join(INSTANCES)
        raise ValueError(f"unknown instance type {name!r}; known: {known}") from None


def load_price_overrides(path: str | Path) -> dict[str, Instance]:
    """A JSON file {"inf2.xlarge": 0.99, ...} replaces the default $/hour of the named instances."""
    prices = json.loads(Path(path).read_text())
    catalog = dict(INSTANCES)
    for name, usd in prices.items():
        catalog[name] = replace(get_instance(name), usd_per_hour=float(usd))
    return catalog
