"""The CPU backend: torch.export + AOTInductor graphs, eager runs, tensor parallelism over gloo."""
