"""The nki_kernels registry and import hygiene."""

from __future__ import annotations

import subprocess
import sys

import nki_kernels
from nki_kernels import availability, reference


def test_kernel_names_are_the_published_tuple():
    assert nki_kernels.KERNELS == (
        "rmsnorm_residual",
        "qkv_rope",
        "decode_attention",
        "prefill_attention",
        "swiglu_mlp",
        "sampling",
    )


def test_every_kernel_has_a_cpu_implementation_and_a_reference():
    for name in nki_kernels.KERNELS:
        function = "sample" if name == "sampling" else name
        assert callable(getattr(nki_kernels, function)), name
        assert callable(getattr(reference, function)), name


def test_importing_the_package_does_not_import_nki():
    code = "import sys, nki_kernels; nki_kernels.nki_available(); print('nki' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_unavailable_reason_is_one_line_or_none():
    reason = availability.nki_unavailable_reason()
    assert reason is None or (reason and "\n" not in reason)
    assert nki_kernels.nki_available() == (reason is None)


def test_version_parsing():
    assert availability._version_tuple("0.3.0") == (0, 3, 0)
    assert availability._version_tuple("0.10.1rc2") == (0, 10, 1)
    # NkiTensor.broadcast, which the kernels use, is new in NKI 0.5 (Neuron SDK 2.31).
    assert availability._version_tuple("0.4.2") < availability.MIN_NKI_VERSION
    assert availability._version_tuple("0.5.0") >= availability.MIN_NKI_VERSION
