"""neuron-serve: compile and serve LLMs on AWS Inferentia2/Trainium and on the CPU."""

__version__ = "0.1.0"
