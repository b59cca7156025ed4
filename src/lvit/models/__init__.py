"""The networks: LViT (text-guided), LViT-T (``use_text=False``) and a U-Net baseline, all built from one
:class:`LViTConfig` and called as ``model(image, text=None, text_mask=None) -> logits``. Each registers itself
in :mod:`.registry` (name, builder, whether it reads reports)."""

from __future__ import annotations

from torch import nn

from .lvit import LViT, LViTConfig
from .registry import build_model, model_entry, model_names, reads_text, register_model
from .unet import UNet

__all__ = ["LViT", "LViTConfig", "UNet", "build_model", "count_parameters", "model_entry", "model_names",
           "reads_text", "register_model"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
