"""The networks: LViT (text-guided), LViT-T (``use_text=False``) and a U-Net baseline, all built from one
:class:`LViTConfig` and called as ``model(image, text=None, text_mask=None) -> logits``."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import ConfigError
from .lvit import LViT, LViTConfig
from .unet import UNet

MODEL_NAMES = ("lvit", "lvit-t", "unet")

__all__ = ["MODEL_NAMES", "LViT", "LViTConfig", "UNet", "build_model", "count_parameters"]


def build_model(name: str, config: LViTConfig | None = None) -> nn.Module:
    """``"lvit"`` (text as the config says), ``"lvit-t"`` (forces ``use_text=False``) or ``"unet"``."""
    config = config or LViTConfig()
    key = name.lower().replace("_", "-")
    if key == "lvit":
        return LViT(config)
    if key == "lvit-t":
        return LViT(dataclasses.replace(config, use_text=False))
    if key == "unet":
        return UNet(config)
    raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
