"""Where a step's batch comes from, step after step.

- :mod:`contrastive.inputs.splits`: a run's data (train, validation and test splits, locked
  features) from its config;
- :mod:`contrastive.inputs.step_inputs`: what the loop asks for each step's input; random
  batches from the grain pipeline;
- :mod:`contrastive.inputs.hard_batch_inputs`: hard batches, whole clusters of similar
  examples (:mod:`contrastive.inputs.hard_batches` the order,
  :mod:`contrastive.inputs.batch_hardness` how hard a batch's negatives are,
  :mod:`contrastive.inputs.clustering` the clusters).

The streamed cache's inputs live with its step (:mod:`contrastive.step.streamed.inputs`).
"""
