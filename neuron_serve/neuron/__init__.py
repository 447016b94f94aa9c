"""The Neuron side. Pure Python, tested everywhere: compiler flags, core assignment, neuron-monitor
parsing. Needing the SDK only where they run (and imported lazily): ``backend`` (ModelBuilder trace,
save, load), ``parallel_model`` (the model with NxD parallel layers), ``neuron_graphs`` (the graphs'
calling convention), ``compile`` (a recipe's graphs into an artifact) and ``runner`` (NeuronRunner)."""
