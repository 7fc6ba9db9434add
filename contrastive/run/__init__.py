"""A training run: assembled from its config, looped, checkpointed, guarded, logged.

- :mod:`contrastive.run.loop`: :func:`~contrastive.run.loop.train`, the loop;
- :mod:`contrastive.run.assemble`: model, state, step and inputs from a config;
- :mod:`contrastive.run.adaptive_batch`: the adaptive batch's rule and phases;
- :mod:`contrastive.run.checkpoint`: orbax checkpoints and their identity checks;
- :mod:`contrastive.run.run_guard`: the work dir's lock, metrics log and stop signals;
- :mod:`contrastive.run.metric_writers`: TensorBoard event files that survive kills;
- :mod:`contrastive.run.hosts`: several processes on one mesh.
"""
