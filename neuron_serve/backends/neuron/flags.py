"""neuronx-cc flags from a recipe's [compiler] section.

Spellings follow the Neuron Compiler CLI reference (``neuronx-cc compile``): ``--target``,
``--model-type``, ``--auto-cast``, ``--auto-cast-type``, ``--optlevel``/``-O``,
``--enable-fast-loading-neuron-binaries``. When a flag repeats, the right-most one wins, which is
why ``extra_flags`` go last: they can override anything generated here.
"""

from __future__ import annotations

from neuron_serve.backends.neuron.quantization import compiler_flags
from neuron_serve.model.quantization import QuantSpec
from neuron_serve.recipe.instances import get_instance
from neuron_serve.recipe.schema import Recipe


def neuronx_cc_flags(recipe: Recipe) -> list[str]:
    """The neuronx-cc command-line flags for a neuron recipe."""
    if recipe.target.kind != "neuron":
        raise ValueError(f"recipe {recipe.name!r} targets {recipe.target.kind!r}; neuronx-cc flags need 'neuron'")
    c = recipe.compiler
    flags = [
        f"--target={get_instance(recipe.target.instance).family}",
        f"--model-type={c.model_type}",
        f"--auto-cast={c.auto_cast}",
    ]
    # --auto-cast-type only has an effect when something is cast.
    if c.auto_cast != "none":
        flags.append(f"--auto-cast-type={c.auto_cast_type}")
    flags.append(f"-O{c.optlevel}")
    # Masks use the dtype's lowest value, but the compiler's own transposes in matmuls can still make
    # infinities, whose arithmetic gives NaN; this turns them into the largest finite values (on trn1
    # and inf2; trn2 accepts it and needs nothing). NxD's ModelBuilder passes it by default too.
    flags.append("--enable-saturate-infinity")
    if c.fast_loading:
        flags.append("--enable-fast-loading-neuron-binaries")
    flags += compiler_flags(QuantSpec.of(recipe.quantization))
    return [*flags, *c.extra_flags]
