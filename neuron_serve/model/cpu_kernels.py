"""The CPU backend's C++ operators (``kernels/*.cpp``), built once per machine and loaded once per
process, so that a compiled graph calls them without Python:

- ``neuron_serve::int8_weight_linear`` and ``neuron_serve::int4_weight_linear``: the weight-only
  quantized linear layers (why: ``quant_ops.py``);
- ``neuron_serve::decode_attention``: a decode row's attention, over exactly the positions its slot
  holds (why, and what it measured: docs/ARCHITECTURE.md, "Decode attention on the CPU").
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

_SOURCES = sorted((Path(__file__).parent / "kernels").glob("*.cpp"))


@functools.cache
def load() -> None:
    """Build (cached by torch in ~/.cache/torch_extensions) and load the operators."""
    from torch.utils import cpp_extension

    # One build per checkout: torch keeps one build directory per name, whose ninja file names the
    # sources' paths, so two checkouts (a clone beside an installed copy) sharing a name would rebuild
    # the kernels, about 90 s on 2 cores, each time the other one had loaded them.
    checkout = hashlib.sha256(str(_SOURCES[0].parent.resolve()).encode()).hexdigest()[:12]
    cpp_extension.load(
        name=f"neuron_serve_cpu_kernels_{checkout}",
        sources=[str(source) for source in _SOURCES],
        # OpenMP: at::parallel_for is compiled into the extension, and is serial without it.
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )
    torch.library.register_fake("neuron_serve::int8_weight_linear", _linear_output)
    torch.library.register_fake("neuron_serve::int4_weight_linear", _int4_linear_output)
    torch.library.register_fake("neuron_serve::decode_attention", _attention_output)


def _linear_output(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))


def _int4_linear_output(x, weights, scales, zeros, group_size: int) -> torch.Tensor:
    return _linear_output(x, weights, scales)


def _attention_output(q, k, v, k_cache, v_cache, layer: int, positions, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)
