"""Training system for large-batch contrastive learning: mesh, gradient cache, models, step.

Submodules are imported on demand (``from contrastive import train_step``) so that
``import contrastive`` stays light.
"""

__all__ = ["gradcache", "mesh", "models", "optim", "train_step"]
