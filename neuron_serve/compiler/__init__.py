"""Stage 1: `neuron-serve compile` turns a recipe into an artifact directory."""
