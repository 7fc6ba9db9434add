"""The train step: one optimiser update of a dual encoder over the global batch.

- :mod:`contrastive.step.train_step`: the step (the loss under ``jit`` over the mesh);
- :mod:`contrastive.step.batch_grads`: each device's loss and partial gradients, and their
  one reduction across devices (what every step shares);
- :mod:`contrastive.step.example_states`: the global loss's per-example state (SogCLR,
  iSogCLR) and its step;
- :mod:`contrastive.step.step_loss`: which loss a config names, with its masks and ids;
- :mod:`contrastive.step.gradcache`: the gradient cache (Gao et al. 2021), batch in memory;
- :mod:`contrastive.step.streamed`: the streamed gradient cache, one chunk of inputs at a time;
- :mod:`contrastive.step.negative_queue`: the queue of past embeddings a step may read;
- :mod:`contrastive.step.optim`: the optimiser and its schedule.
"""
