"""The streamed gradient cache (``--stream``): a step that holds one chunk of raw inputs at a time.

- :mod:`contrastive.step.streamed.step`: the step itself (embed every chunk, then re-encode
  each under ``vjp``);
- :mod:`contrastive.step.streamed.programs`: the compiled per-chunk programs it runs;
- :mod:`contrastive.step.streamed.sources`: chunk sources, their layout and checks;
- :mod:`contrastive.step.streamed.inputs`: chunk sources as the training loop's step inputs.
"""
