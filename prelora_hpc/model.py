"""The Vision Transformer, from timm's registry.

Any timm ViT works; the config may override width, depth, heads and patch
size so that the same preset scales from a CPU toy to ViT-L/16.
"""

from __future__ import annotations


import timm
import torch.nn as nn

from .config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """Create a randomly initialised timm ViT as ``cfg`` describes.

    Never downloads weights (pre-training starts from scratch). Raises
    ValueError naming the model when timm does not know it.
    """
    if cfg.name not in timm.list_models():
        raise ConfigError(f"model.name: timm has no model {cfg.name!r}")
    overrides = {
        k: getattr(cfg, k)
        for k in ("patch_size", "embed_dim", "depth", "num_heads")
        if getattr(cfg, k) is not None
    }
    return timm.create_model(
        cfg.name,
        pretrained=False,
        img_size=cfg.img_size,
        num_classes=cfg.num_classes,
        in_chans=cfg.in_chans,
        drop_path_rate=cfg.drop_path_rate,
        drop_rate=cfg.drop_rate,
        **overrides,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
