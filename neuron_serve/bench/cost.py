"""What the measured throughput costs on an Inf2/Trn1 instance, from the catalog in ``neuron_serve.recipe.instances``.

The instance runs ``replicas`` model replicas; the endpoint that was measured ran ``measured_replicas``
of them (by default all of them: the benchmark hit the whole instance). When fewer were measured, the
instance's throughput is the measured one scaled up linearly, a fair guess for replicas on separate
NeuronCores. Then:

    USD per 1M output tokens = USD per hour / (output tokens/s * 3600) * 1e6
    USD per 10k requests     = USD per hour / (requests/s * 3600) * 1e4
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from neuron_serve.recipe.instances import PRICE_SOURCE, Instance, get_instance, load_price_overrides

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class CostModel:
    instance: Instance
    price_source: str
    replicas: int = 1
    measured_replicas: int = 1

    def __post_init__(self) -> None:
        if self.replicas < 1 or not 1 <= self.measured_replicas <= self.replicas:
            raise ValueError(f"need 1 <= measured replicas ({self.measured_replicas}) <= replicas ({self.replicas})")
        if self.replicas > self.instance.neuron_cores:
            raise ValueError(
                f"{self.instance.name} has {self.instance.neuron_cores} NeuronCores: "
                f"it cannot run {self.replicas} replicas (each needs at least one)"
            )

    @property
    def usd_per_hour(self) -> float:
        return self.instance.usd_per_hour

    def instance_rate(self, measured_per_s: float) -> float:
        """What the whole instance does per second, given what the measured replicas did."""
        return measured_per_s * self.replicas / self.measured_replicas

    def usd_per_unit(self, measured_per_s: float, units: float) -> float | None:
        """Cost of ``units`` items (tokens, requests) at a measured rate; None when nothing was served."""
        rate = self.instance_rate(measured_per_s)
        if rate <= 0:
            return None
        return self.usd_per_hour / (rate * SECONDS_PER_HOUR) * units

    def level_cost(self, metrics: dict[str, Any]) -> dict[str, float | None]:
        """The cost keys added to one load level's results."""
        return {
            "usd_per_hour": self.usd_per_hour,
            "instance_output_throughput": self.instance_rate(metrics["output_throughput"]),
            "usd_per_1m_output_tokens": self.usd_per_unit(metrics["output_throughput"], 1e6),
            "usd_per_10k_requests": self.usd_per_unit(metrics["request_throughput"], 1e4),
        }

    def describe(self) -> dict[str, Any]:
        return {
            **asdict(self.instance),
            "price_source": self.price_source,
            "replicas": self.replicas,
            "measured_replicas": self.measured_replicas,
            "neuron_cores_per_replica": self.instance.neuron_cores // self.replicas,
        }


def resolve_cost_model(
    instance: str,
    price_file: str | Path | None = None,
    usd_per_hour: float | None = None,
    replicas: int = 1,
    measured_replicas: int | None = None,
) -> CostModel:
    """The catalog entry of ``instance`` with its price overridden by ``usd_per_hour`` (first) or a
    ``price_file`` (JSON ``{"inf2.xlarge": 0.99}``), and where the price came from."""
    inst = get_instance(instance)
    source = PRICE_SOURCE
    if price_file is not None:
        overridden = load_price_overrides(price_file)[instance]
        if overridden != inst:  # the file may list other instances only
            inst, source = overridden, f"price file {price_file}"
    if usd_per_hour is not None:
        inst, source = replace(inst, usd_per_hour=float(usd_per_hour)), "--usd-per-hour"
    return CostModel(inst, source, replicas, measured_replicas or replicas)
