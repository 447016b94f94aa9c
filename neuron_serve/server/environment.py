"""Configuration by environment, as containers are configured: neuron-serve's own NEURON_SERVE_* names,
SageMaker's SAGEMAKER_* names, and LMI's OPTION_* names (``server/sagemaker.py``).

A command-line option wins over every variable; NEURON_SERVE_* wins over SAGEMAKER_*; a variable wins
over the recipe's [serve] table. README's "Configuration by environment" table lists these same names.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvSetting:
    option: str  # the `serve` option's attribute
    variables: tuple[str, ...]  # first set wins
    kind: type = str


SERVE_SETTINGS = (
    EnvSetting("port", ("NEURON_SERVE_PORT", "SAGEMAKER_BIND_TO_PORT"), int),
    EnvSetting("host", ("NEURON_SERVE_HOST",)),
    EnvSetting("workers", ("NEURON_SERVE_WORKERS", "SAGEMAKER_MODEL_SERVER_WORKERS"), int),
    EnvSetting("timeout", ("NEURON_SERVE_TIMEOUT", "SAGEMAKER_MODEL_SERVER_TIMEOUT"), int),
    EnvSetting("max_waiting", ("NEURON_SERVE_MAX_WAITING",), int),
    EnvSetting("model_name", ("NEURON_SERVE_MODEL_NAME",)),
)
MODEL_VARIABLE = "NEURON_SERVE_MODEL"  # what to serve, as `serve`'s targets: space-separated


def apply_environment(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> list[str]:
    """Fill each `serve` option the command line left unset from the environment; return what was taken,
    as "OPTION=VALUE from VARIABLE" lines for the log."""
    taken = []
    for setting in SERVE_SETTINGS:
        if getattr(args, setting.option) is not None:
            continue
        variable = next((v for v in setting.variables if env.get(v)), None)
        if variable is None:
            continue
        setattr(args, setting.option, _parse(variable, env[variable], setting.kind))
        taken.append(f"{setting.option}={env[variable]} from {variable}")
    if not args.targets and env.get(MODEL_VARIABLE):
        args.targets = env[MODEL_VARIABLE].split()
        taken.append(f"models {' '.join(args.targets)} from {MODEL_VARIABLE}")
    return taken


def _parse(variable: str, value: str, kind: type):
    if kind is int:
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{variable}={value!r}: expected a whole number of at least 1")
        return int(value)
    return value
