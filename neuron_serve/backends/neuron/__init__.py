"""The Neuron backend: neuronx-distributed ModelBuilder graphs on NeuronCores (SDK imported only where present)."""
