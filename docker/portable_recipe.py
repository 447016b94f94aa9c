"""A recipe as the cpu image compiles it at build time: ``model.dtype = "auto"`` made float32.

"auto" picks the precision of the machine that compiles (bf16 where the CPU has avx512_bf16 or AMX,
`backends/cpu/precision.py`), and an image runs wherever it is pulled: bf16 compiled on the build host
would be emulated, many times slower, on a host without those instructions, while float32 runs at
full speed on every x86-64 CPU. Used by the Dockerfile:

    python docker/portable_recipe.py compile/smollm2-135m-cpu.toml /tmp/smollm2-135m-cpu.toml
"""

from __future__ import annotations

import dataclasses
import sys

from neuron_serve.recipe.files import load_recipe, save_recipe
from neuron_serve.recipe.schema import AUTO_DTYPE, Recipe

PORTABLE_DTYPE = "float32"


def portable(recipe: Recipe) -> Recipe:
    if recipe.model.dtype != AUTO_DTYPE:
        return recipe
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype=PORTABLE_DTYPE))


def main(argv: list[str]) -> int:
    source, target = argv
    comment = f"{source} with model.dtype = {PORTABLE_DTYPE!r}, for the cpu image"
    save_recipe(portable(load_recipe(source)), target, comment)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
