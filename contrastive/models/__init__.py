"""Models (flax NNX): small towers that run on a CPU, the dual encoder, CLIP-sized towers.

- :mod:`contrastive.models.towers`: MLP, GroupNorm ResNet, ViT, text transformer;
- :mod:`contrastive.models.dual_encoder`: :class:`DualEncoder` (heads, temperature, bias);
- :mod:`contrastive.models.clip`: the CLIP sizes (ViT-B/32 ... ViT-L/14) for the planner.
"""

from contrastive.models.clip import (
    CLIP_CONFIGS,
    ClipConfig,
    ClipImageTower,
    ClipTextTower,
    StackedBlocks,
    clip_config,
    clip_input_spec,
    clip_model,
)
from contrastive.models.dual_encoder import (
    CLIP_INIT_TEMPERATURE,
    SIGLIP_INIT_BIAS,
    SIGLIP_INIT_TEMPERATURE,
    DualEncoder,
    encode_fn,
)
from contrastive.models.towers import (
    IMAGE_ENCODERS,
    MLPEncoder,
    ResNetEncoder,
    TextTransformer,
    ViTEncoder,
    dropout,
    make_image_encoder,
)

__all__ = [
    "MLPEncoder",
    "ResNetEncoder",
    "ViTEncoder",
    "TextTransformer",
    "DualEncoder",
    "make_image_encoder",
    "encode_fn",
    "dropout",
    "ClipConfig",
    "CLIP_CONFIGS",
    "StackedBlocks",
    "ClipImageTower",
    "ClipTextTower",
    "clip_config",
    "clip_model",
    "clip_input_spec",
    "IMAGE_ENCODERS",
    "CLIP_INIT_TEMPERATURE",
    "SIGLIP_INIT_TEMPERATURE",
    "SIGLIP_INIT_BIAS",
]
