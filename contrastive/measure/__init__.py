"""Measurements of a model or a run: evaluation (probes, k-NN, retrieval), the noise scale
(:mod:`~contrastive.measure.noise_scale`; the per-example split, a diagnostic, in
:mod:`~contrastive.measure.per_example_noise`)."""
