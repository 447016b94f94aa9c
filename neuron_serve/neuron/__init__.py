"""The Neuron side: compiler flags, core assignment and monitor parsing (pure Python, tested
everywhere) and the SDK-backed tracing in ``backend`` (imported only where the SDK is installed)."""
