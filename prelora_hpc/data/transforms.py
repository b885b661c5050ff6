"""timm's ImageNet transforms, set from the data config.

Training: RandomResizedCrop(scale) + horizontal flip + (optional) RandAugment
or timm's default colour jitter, then normalisation. Validation: resize to
img_size / crop_pct and centre crop. Both take an RGB PIL image and give a
float32 tensor [3, img_size, img_size].
"""

from __future__ import annotations

from typing import Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from ..config import DataConfig


def build_transform(data_cfg: DataConfig, img_size: int, is_training: bool) -> Callable:
    """The train (augmenting) or validation (deterministic) transform at ``img_size`` pixels."""
    return create_transform(
        input_size=(3, img_size, img_size),
        is_training=is_training,
        auto_augment=data_cfg.auto_augment,
        hflip=data_cfg.hflip,
        scale=tuple(data_cfg.scale),
        crop_pct=data_cfg.crop_pct,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )
