"""The backend seam (``base.py``) and its implementations: ``cpu/`` (every test runs it) and ``neuron/``."""
