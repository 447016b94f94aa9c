"""Serving one replica: the scheduler (policy), the engine thread, sequences, sampling, the forward process, metrics."""
