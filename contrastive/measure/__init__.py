"""Measurements of a model or a run: evaluation (probes, k-NN, retrieval), the noise scale."""
