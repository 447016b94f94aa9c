"""Which implementation of each fused kernel a model calls: one decision, by the device it runs on.

- ``cpu``: the CPU versions of the tiled algorithms (`nki_kernels.cpu`), traceable by torch.export.
- ``neuron``: the NKI kernels (`nki_kernels.nki`), each launched with ``nki.jit`` from the traced
  model, so that the Neuron compiler builds them into the graph's NEFF (NKI >= 0.5, the Neuron
  SDK's ``nki`` package; importing them imports ``nki``).

"sampling" is not the model's: the engine samples on the host from the logits, with the CPU kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEVICES = ("cpu", "neuron")


def implementations(device: str) -> Any:
    """An object whose attributes are the kernels' functions for ``device``, with the CPU signatures."""
    if device == "cpu":
        from nki_kernels import cpu

        return cpu
    if device == "neuron":
        import nki

        from nki_kernels.nki.host import NkiCalls

        return NkiCalls(nki.jit)
    raise ValueError(f"unknown kernel device {device!r}; known: {', '.join(DEVICES)}")


@dataclass(frozen=True)
class Kernels:
    """The fused kernels one model calls, as functions for its device; None where the plain ops run."""

    rmsnorm_residual: Callable | None = None
    qkv_rope: Callable | None = None
    decode_attention: Callable | None = None
    prefill_attention: Callable | None = None
    swiglu_mlp: Callable | None = None

    @classmethod
    def enabled(cls, names: frozenset[str], device: str = "cpu") -> Kernels:
        model_kernels = {f.name for f in dataclasses.fields(cls)} & set(names)
        if not model_kernels:
            return cls()
        functions = implementations(device)
        return cls(**{name: getattr(functions, name) for name in model_kernels})
