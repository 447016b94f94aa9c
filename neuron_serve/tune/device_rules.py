"""What `tune` changes, and what it only advises, from a device profile (``device_profile.py``).

- **Fused decode attention**: when attention takes a large share of decode time on a NeuronCore, the
  NKI decode-attention kernel replaces the compiler's lowering of it. On the CPU the kernel's version
  is no faster than torch's attention (``nki_kernels/README.md``: on par at batch 32, 2x slower at
  batch 1), so there it is not enabled.
- **Compiler optimization level** (neuron): decode graphs that reach neither roof (MBU and MFU both low:
  instruction-issue or latency bound) are what ``-O3``'s more aggressive scheduling is for.
- **Quantization** is advised, never made: a bandwidth-bound decode reads fewer bytes with int8 weights,
  but the profile holds no evidence of the quality it costs; ``neuron-serve eval`` measures that.
- **Spills** are reported: a graph whose working set overflows on-chip memory reloads it from HBM.
"""

from __future__ import annotations

import dataclasses

from neuron_serve.recipe.schema import Recipe
from neuron_serve.tune.device_profile import DeviceProfile, PhaseSummary
from neuron_serve.tune.neuron_profile import BOUND_LOW
from neuron_serve.tune.serving import Change

ATTENTION_SHARE = 0.3  # of decode time: past it, attention is the decode graph's largest cost after weights
SPILL_SHARE = 0.05  # of the bytes a phase reads: less is noise from the odd large tile


def tune_from_device(recipe: Recipe, device: DeviceProfile) -> tuple[Recipe, list[Change], list[str]]:
    """(the recipe, its changes, advice that is not a change)."""
    decode, prefill = device.phase("decode"), device.phase("prefill")
    changes, advice = [], []
    if decode is None:
        return recipe, changes, [f"the device profile of {device.deployment} holds no decode graph"]
    recipe, change = _decode_attention(recipe, decode, device.target)
    changes.append(change)
    if device.target == "neuron":
        recipe, change = _optlevel(recipe, decode)
        changes.append(change)
    for phase in filter(None, (decode, prefill)):
        advice.append(phase.describe())
        reads = sum(g.calls * g.bytes_per_call for g in device.graphs if g.phase == phase.phase)
        if reads and phase.spill_bytes > SPILL_SHARE * reads:
            advice.append(
                f"{phase.phase} spills {phase.spill_bytes / reads:.0%} of the bytes it reads: lower shapes.batch_size "
                "or raise target.tp_degree to shrink each core's working set"
            )
    if decode.bound == "bandwidth" and recipe.quantization.method == "none":
        advice.append(
            f"decode is bandwidth-bound (MBU {decode.mbu:.0%}, MFU {decode.mfu:.0%}): quantization.method = "
            '"int8-weight" reads a quarter of fp32 weights (half of bf16); check its quality with `neuron-serve eval`'
        )
    return recipe, changes, advice


def _decode_attention(recipe: Recipe, decode: PhaseSummary, target: str) -> tuple[Recipe, Change]:
    enabled = list(recipe.kernels.enabled)
    share = decode.shares.get("attention", 0.0)
    figure = f"attention takes {share:.0%} of decode time"
    if "decode_attention" in enabled:
        return recipe, Change("kernels.enabled", enabled, enabled, f"{figure}; decode_attention is already enabled")
    if share < ATTENTION_SHARE:
        return recipe, Change("kernels.enabled", enabled, enabled, f"{figure}, under {ATTENTION_SHARE:.0%}: kept")
    if target != "neuron":
        reason = f"{figure}, but the kernel's CPU version is no faster than torch's (nki_kernels/README.md)"
        return recipe, Change("kernels.enabled", enabled, enabled, reason)
    after = [*enabled, "decode_attention"]
    fused = dataclasses.replace(recipe, kernels=dataclasses.replace(recipe.kernels, enabled=after))
    return fused, Change("kernels.enabled", enabled, after, f"{figure}: the fused NKI kernel takes it over")


def _optlevel(recipe: Recipe, decode: PhaseSummary) -> tuple[Recipe, Change]:
    level = recipe.compiler.optlevel
    if decode.mbu is None or decode.mfu is None:
        return recipe, Change("compiler.optlevel", level, level, "decode MBU/MFU not measured")
    figure = f"decode at MBU {decode.mbu:.0%}, MFU {decode.mfu:.0%}"
    if level >= 3 or max(decode.mbu, decode.mfu) > BOUND_LOW:
        return recipe, Change("compiler.optlevel", level, level, f"{figure}: kept")
    raised = dataclasses.replace(recipe, compiler=dataclasses.replace(recipe.compiler, optlevel=3))
    return raised, Change("compiler.optlevel", level, 3, f"{figure}, under {BOUND_LOW:.0%} of both roofs: -O3")
