"""Which cores each replica of each served model gets (server/placement.py), and the refusal when the
models do not fit."""

from __future__ import annotations

import os

import pytest

from neuron_serve.backends.neuron.cores import core_range
from neuron_serve.recipe.schema import Recipe, TargetSection
from neuron_serve.server.placement import plan_placement


def neuron(tp: int, instance: str = "inf2.48xlarge") -> Recipe:
    return Recipe(name=f"tp{tp}", target=TargetSection(kind="neuron", instance=instance, tp_degree=tp))


def ranges(plan, name: str) -> list[str]:
    return [core_range(cores.first, cores.count) for cores in plan[name]]


def test_neuron_replicas_take_tp_degree_consecutive_cores():
    assert ranges(plan_placement({"a": neuron(8)}, 3), "a") == ["0-7", "8-15", "16-23"]
    assert ranges(plan_placement({"a": neuron(1, "inf2.xlarge")}, 2), "a") == ["0", "1"]


def test_two_models_sit_side_by_side_and_never_share_a_core():
    plan = plan_placement({"big": neuron(8), "small": neuron(4)}, 2)
    assert ranges(plan, "big") == ["0-7", "8-15"]
    assert ranges(plan, "small") == ["16-19", "20-23"]


def test_models_that_do_not_fit_are_refused_with_what_each_needs():
    with pytest.raises(ValueError, match=r"\(a 2 x 8, b 2 x 8\) take 32 NeuronCores, and this host has 24"):
        plan_placement({"a": neuron(8), "b": neuron(8)}, 2)


def test_cpu_models_split_this_process_cpus_equally():
    cpus = len(os.sched_getaffinity(0))
    plan = plan_placement({"a": Recipe(name="a"), "b": Recipe(name="b")}, 1)
    share = cpus // 2
    assert (plan["a"][0].first, plan["a"][0].count) == (0, share)
    assert (plan["b"][0].first, plan["b"][0].count) == (share, share)
    with pytest.raises(ValueError, match=rf"take {cpus + 1} CPUs, and this host has {cpus}"):
        plan_placement({"a": Recipe(name="a")}, cpus + 1)


def test_models_of_two_target_kinds_are_refused():
    with pytest.raises(ValueError, match="the models target cpu and neuron"):
        plan_placement({"a": Recipe(name="a"), "b": neuron(8)}, 1)
