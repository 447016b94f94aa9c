"""Tracing, saving and loading graphs with the Neuron SDK (neuronx-distributed's ModelBuilder).

Imported anywhere, but every function that does work needs torch-neuronx and neuronx-distributed
(installed from AWS's pip repository on Inf2/Trn1 hosts) and raises NeuronUnavailable without them.

One ModelBuilder holds every graph of a recipe (one per context and token bucket), all sharing one
set of TP-sharded weights. At run time the traced model routes each call to the graph whose example
input shapes match the call's exactly, so every graph must have distinct input shapes.
"""

from __future__ import annotations

import importlib.util
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from neuron_serve.backends.neuron.flags import neuronx_cc_flags
from neuron_serve.recipe.schema import Recipe

# The one Neuron SDK release neuron-serve is written against (README, docs/ARCHITECTURE.md): 2.31.1,
# whose pytorch-inference-neuronx deep-learning container is the Dockerfile's base (the last one: from
# SDK 2.32 the DLCs no longer ship NxD). These are that image's pins (aws-neuron/deep-learning-containers
# at tag 2.31.1, pytorch/inference/2.9.0/Dockerfile.neuronx), and the `neuron` extra's. NKI 0.5 is the
# first with NkiTensor.broadcast, which the kernels use (nki_kernels/availability.py).
SDK_RELEASE = "2.31.1"
SDK_PINS = {
    "torch-neuronx": "2.9.0.2.15.32035",
    "neuronx-distributed": "0.19.28492",
    "neuronx-cc": "2.26.6360.0",
    "nki": "0.5.0",
}
# import name -> pip package name
SDK_PACKAGES = {"torch_neuronx": "torch-neuronx", "neuronx_distributed": "neuronx-distributed"}
NEURON_PIP_INDEX = "https://pip.repos.neuron.amazonaws.com"
MODEL_FILE = "nxd_model.pt"
WEIGHTS_DIR = "weights"


class NeuronUnavailable(RuntimeError):
    """The Neuron SDK is not installed here."""


def missing_packages() -> list[str]:
    return [pip for module, pip in SDK_PACKAGES.items() if importlib.util.find_spec(module) is None]


def is_available() -> bool:
    return not missing_packages()


def require_sdk() -> None:
    missing = missing_packages()
    if missing:
        raise NeuronUnavailable(
            f"the Neuron SDK is not installed (missing: {', '.join(missing)}). On an Inf2/Trn1 host (or "
            f"the Neuron deep-learning image) run: pip install --extra-index-url={NEURON_PIP_INDEX} "
            f"{' '.join(SDK_PACKAGES.values())}  (the PyPI packages of these names are empty placeholders)"
        )


def _model_instance(module_factory: Callable[[], torch.nn.Module]) -> Any:
    from neuronx_distributed.trace.model_builder import BaseModelInstance

    class _Instance(BaseModelInstance):
        # ModelBuilder calls load_module() (BaseModelInstance's: module_factory()) inside its mocked TP
        # world, so parallel layers built by the factory see the right tp_degree; then get() per bucket.
        def get(self, bucket_rank: int, **kwargs: Any) -> tuple[torch.nn.Module, dict]:
            # The aliases name the module's own Parameter objects, so they are made per call, as NxD
            # Inference's DecoderModelInstance.get does (NxDI 0.9, models/model_wrapper.py).
            aliases = getattr(self.module, "cache_aliases", dict)()
            return self.module, aliases

    return _Instance(module_factory, input_output_aliases={})


def _no_checkpoint() -> dict[str, torch.Tensor]:
    raise RuntimeError("this compile has no checkpoint: each rank's weights are given to load_compiled")


def compile_graphs(
    recipe: Recipe,
    module_factory: Callable[[], torch.nn.Module],
    example_inputs: Mapping[str, tuple[torch.Tensor, ...]],
    checkpoint_loader: Callable[[], dict[str, torch.Tensor]] | None,
    out_dir: str | Path,
    workdir: str | Path,
) -> Path:
    """Trace and compile one graph per ``example_inputs`` entry; write the model (and weight shards).

    ``module_factory()`` builds the graphs' module with neuronx-distributed parallel layers: every
    graph runs the same code at its own input shapes. A module with device state (parameters that
    its outputs update) names them in ``module.cache_aliases()``, ModelBuilder's input_output_aliases.
    ``checkpoint_loader`` returns the full (unsharded) state dict, which ModelBuilder shards per TP
    rank into ``out_dir/weights/tp{rank}_sharded_checkpoint.safetensors``; None writes no shards (the
    caller hands each rank's weights to `load_compiled`). ``workdir`` holds neuronx-cc's intermediate
    files and logs (``workdir/<key>/_tp0_bk0/graph.neff``); ModelBuilder deletes and recreates it.
    Writes ``out_dir/nxd_model.pt``.
    """
    require_sdk()
    from neuronx_distributed.trace.model_builder import ModelBuilder

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    builder = ModelBuilder(
        router=None,
        tp_degree=recipe.target.tp_degree,
        checkpoint_loader=checkpoint_loader or _no_checkpoint,
        compiler_workdir=str(workdir),
    )
    # A string, not a list: ModelBuilder appends " --logfile=..." to it with +=.
    compiler_args = shlex.join(neuronx_cc_flags(recipe))
    for key, inputs in example_inputs.items():
        builder.add(
            key=key,
            model_instance=_model_instance(module_factory),
            example_inputs=[inputs],
            compiler_args=compiler_args,
        )
    # Weights are sharded to files below rather than baked into the traced model.
    traced = builder.trace(initialize_model_weights=False)
    torch.jit.save(traced, out_dir / MODEL_FILE)
    if checkpoint_loader is not None:
        builder.shard_checkpoint(serialize_path=str(out_dir / WEIGHTS_DIR))
    return out_dir / MODEL_FILE


def load_compiled(out_dir: str | Path, tp_degree: int, weights: list[dict[str, torch.Tensor]] | None = None) -> Any:
    """Load what compile_graphs wrote onto this process's NeuronCores (NEURON_RT_VISIBLE_CORES).

    ``weights``: each rank's tensors by parameter name; None reads the shards compile_graphs wrote.
    The result is called as ``model(*inputs)``, with the argument list of every graph (the saved
    executor is traced from the last graph's), routes by input shapes and returns the outputs that
    are not aliased to states (a bare tensor when there is one).
    """
    require_sdk()
    import torch_neuronx  # noqa: F401  (registers the Neuron runtime ops that torch.jit.load needs)
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    model = torch.jit.load(str(out_dir / MODEL_FILE))
    if weights is None:
        weights = [
            load_file(str(out_dir / WEIGHTS_DIR / f"tp{rank}_sharded_checkpoint.safetensors"))
            for rank in range(tp_degree)
        ]
    if len(weights) != tp_degree:
        raise ValueError(f"{len(weights)} ranks of weights for tp_degree {tp_degree}")
    model.nxd_model.initialize(weights, torch.tensor([0], dtype=torch.int32))
    return model
