"""Cost per token and per request from the instance catalog's USD per hour."""

from __future__ import annotations

import json

import pytest

from neuron_serve.bench.cost import CostModel, resolve_cost_model
from neuron_serve.recipe.instances import INSTANCES, PRICE_SOURCE, get_instance


def test_usd_per_million_output_tokens():
    cost = resolve_cost_model("inf2.xlarge")
    # 0.7582 USD/hour at 1000 tok/s: 3.6M tokens an hour, so 0.7582 / 3.6 USD per 1M tokens.
    assert cost.usd_per_unit(1000.0, 1e6) == pytest.approx(0.7582 / 3.6)
    assert cost.price_source == PRICE_SOURCE


def test_usd_per_10k_requests():
    cost = resolve_cost_model("trn1.32xlarge")
    # 21.50 USD/hour at 2 req/s: 7200 requests an hour.
    assert cost.usd_per_unit(2.0, 1e4) == pytest.approx(21.50 / 7200 * 1e4)


def test_no_throughput_has_no_cost():
    assert resolve_cost_model("inf2.xlarge").usd_per_unit(0.0, 1e6) is None


def test_level_cost_keys():
    cost = CostModel(get_instance("inf2.8xlarge"), "test", replicas=2, measured_replicas=2)
    got = cost.level_cost({"output_throughput": 500.0, "request_throughput": 4.0})
    assert got["usd_per_hour"] == INSTANCES["inf2.8xlarge"].usd_per_hour
    assert got["instance_output_throughput"] == 500.0
    assert got["usd_per_1m_output_tokens"] == pytest.approx(1.9679 / (500 * 3600) * 1e6)
    assert got["usd_per_10k_requests"] == pytest.approx(1.9679 / (4 * 3600) * 1e4)


def test_measuring_one_replica_scales_to_the_instance():
    # inf2.48xlarge, 12 replicas of TP 2; one replica measured at 100 tok/s: the instance does 1200.
    cost = resolve_cost_model("inf2.48xlarge", replicas=12, measured_replicas=1)
    assert cost.instance_rate(100.0) == 1200.0
    assert cost.usd_per_unit(100.0, 1e6) == pytest.approx(12.9813 / (1200 * 3600) * 1e6)
    assert cost.describe()["neuron_cores_per_replica"] == 2
    # By default the endpoint measured is the whole instance: no scaling.
    assert resolve_cost_model("inf2.48xlarge", replicas=12).instance_rate(100.0) == 100.0


def test_replicas_are_checked_against_the_instance():
    with pytest.raises(ValueError, match="NeuronCores"):
        resolve_cost_model("inf2.xlarge", replicas=4)
    with pytest.raises(ValueError, match="measured replicas"):
        resolve_cost_model("inf2.24xlarge", replicas=2, measured_replicas=3)
    with pytest.raises(ValueError, match="unknown instance"):
        resolve_cost_model("p5.48xlarge")


def test_price_overrides_from_file_then_flag(tmp_path):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"inf2.xlarge": 0.5, "trn1.2xlarge": 1.0}))
    from_file = resolve_cost_model("inf2.xlarge", price_file=prices)
    assert (from_file.usd_per_hour, from_file.price_source) == (0.5, f"price file {prices}")
    assert from_file.usd_per_unit(1000.0, 1e6) == pytest.approx(0.5 / 3.6)
    from_flag = resolve_cost_model("inf2.xlarge", price_file=prices, usd_per_hour=0.25)
    assert (from_flag.usd_per_hour, from_flag.price_source) == (0.25, "--usd-per-hour")
    # A file that does not list the instance leaves the catalog price, and says so.
    other = resolve_cost_model("inf2.48xlarge", price_file=prices)
    assert (other.usd_per_hour, other.price_source) == (12.9813, PRICE_SOURCE)
