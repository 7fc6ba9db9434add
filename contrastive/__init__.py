"""Training system for large-batch contrastive learning, in rooms by concern.

- :mod:`contrastive.configs`, :mod:`contrastive.settings`, :mod:`contrastive.loss_registry`,
  :mod:`contrastive.mesh`: a run's config, named settings, the losses, the device mesh;
- :mod:`contrastive.data`: data sets (TFDS + grain, generated shapes, digits, own pairs);
- :mod:`contrastive.models`: towers, the dual encoder, locked towers and their features;
- :mod:`contrastive.step`: the train step, gradient cache, streamed cache, optimiser;
- :mod:`contrastive.measure`: evaluation and the gradient noise scale;
- :mod:`contrastive.inputs`: where each step's batch comes from (random, hard batches);
- :mod:`contrastive.run`: the training loop, assembly, checkpoints, guards, metric writers.

Submodules are imported on demand (``from contrastive.step import train_step``) so that
``import contrastive`` stays light.
"""

__all__ = ["data", "inputs", "measure", "mesh", "models", "run", "step"]
