"""The CPU kernels of the quantized linear layers, as torch operators that torch.export records and
AOTInductor graphs call: ``neuron_serve::int8_weight_linear`` and ``neuron_serve::int4_weight_linear``
(C++, ``kernels/weight_only_linear.cpp``, built by ``cpu_kernels.py``), and
``neuron_serve::int8_dynamic_linear`` (fbgemm's kernel behind Python). Each takes a group of layers'
weights at once (q/k/v, gate/up) and returns their outputs side by side.

Measured on the development machine (AVX2 AMD EPYC without VNNI or AVX-512, 2 threads; all 30 layers
of the default model, then lm_head; ``python -m benchmarks.quant_kernels`` prints the table):

- ATen's int8 weight-only kernel (``_weight_int8pack_mm``, torchao's CPU path) and its int4 kernel
  (``_weight_int4pack_mm_for_cpu``) have no AVX2 code: slower than fp32 at one row, 10-40x slower at
  8 to 32 rows. Inductor's int8 weight-only GEMM template, tried once while choosing (torch.compile
  with frozen weights and max-autotune), took 30 ms at one row and 89 at 32 against fp32's 56 and 113:
  slower than the kernel below, and tried only with weights frozen into the graph, which ours are not.
- fbgemm's dynamic int8 linear, grouped, is fast (in one run: 36 % of fp32's time at one row, 63 % at
  32, its lm_head a third of fp32's) but rounds the activations to 7 bits: +11-13 % perplexity on the
  default model, where the quality goal is 1 %.
- So int8 and int4 weight-only are kernels of our own: quantized rows widened to fp32 in registers and
  multiplied with AVX2 (or AVX-512) FMAs, the activations untouched: in the same run, grouped, int8
  took 18 % of fp32's time at one row and 72 % at 32. Which path a call takes by its rows and dtype
  (on AVX2, widened once per call from 32 or 64 rows; oneDNN's bf16 matmul for bf16 activations from 16) is
  in ``kernels/weight_only_linear.cpp``, with what each measured.

fbgemm needs its weights in a layout made for the machine (its packed matrix), while a graph's
constants are the artifact's portable tensors. The operator makes that layout on first use and keeps
it for the life of the process, keyed by the tensors it was made from; the entry holds them, so their
memory is never freed and reused under the same key.
fbgemm's packed weight is a TorchScript object that torch.export cannot trace (no
``__obj_flatten__``), hence an operator on plain tensors around it.

fbgemm quantizes the activations with one scale per call: each row is divided by its own largest
magnitude first and the output rows multiplied back (exact, as a linear layer is linear in each row),
so every token is quantized on its own range and a sequence's result does not depend on which other
sequences share its step.
"""

from __future__ import annotations

import threading
import warnings

import torch

_LIBRARY = torch.library.Library("neuron_serve", "FRAGMENT")
_LIBRARY.define("int8_dynamic_linear(Tensor x, Tensor[] weights, Tensor[] scales) -> Tensor")

_prepared: dict[tuple, tuple[list[torch.Tensor], object]] = {}
_lock = threading.Lock()


def _prepare(tensors: list[torch.Tensor], make):
    """The layout made by `make()` for these tensors, made once per process."""
    key = tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors)
    entry = _prepared.get(key)
    if entry is None:
        with _lock:
            entry = _prepared.get(key)
            if entry is None:
                entry = _prepared[key] = (list(tensors), make())
    return entry[1]


def _fbgemm_packed(weights: list[torch.Tensor], scales: list[torch.Tensor]):
    weight, scale = torch.cat(weights), torch.cat(scales).reshape(-1).double()
    zeros = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch 2.13 deprecates its quantized tensor types (pytorch#184982); fbgemm's prepack still
        # takes one, and no other interface to this kernel exists yet.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        quantized = torch._make_per_channel_quantized_tensor(weight, scale, zeros, 0)
    return torch.ops.quantized.linear_prepack(quantized, None)


def _int8_dynamic_linear(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    packed = _prepare([*weights, *scales], lambda: _fbgemm_packed(weights, scales))
    rows = x.float()
    magnitude = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    out = torch.ops.quantized.linear_dynamic(rows / magnitude, packed, True)
    return (out * magnitude).to(x.dtype)


def _output_shape(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))


_LIBRARY.impl("int8_dynamic_linear", _int8_dynamic_linear, "CPU")
torch.library.register_fake("neuron_serve::int8_dynamic_linear", lambda x, weights, scales: _output_shape(x, weights))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [N, K] (0..15) -> bytes [N, K/2], column 2j in the low nibble, 2j+1 in the high one."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
