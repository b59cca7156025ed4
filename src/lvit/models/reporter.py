"""The report writer's network: a small CNN that reads a chest X-ray and scores the six lung zones of LViT's
report template (upper / middle / lower x left / right lung) as independent yes/no flags.

``ZoneClassifier(config)(image [B, C, S, S]) -> logits [B, n_flags]`` (no sigmoid). Where the lesions lie is what
the flags say, so the head keeps a coarse spatial grid instead of pooling everything away: four stride-2 stages
(the first a strided 3x3 convolution, then max-pools) take S to S/16, an adaptive average pool brings that to a
``pool_grid x pool_grid`` map, and a two-layer MLP maps the flattened map to the flags. At the defaults (128 px,
width 16, grayscale) that is ~0.2 M parameters and ~60 M multiply-adds per image: a few minutes an epoch over
QaTa-COV19's 5,716 training images on one CPU thread. With ``mask_head`` a 1x1 convolution on the S/8
features also predicts the lesion mask there: an auxiliary loss during training (pixel-level supervision of
where lesions are), unused when writing reports.

The flag order and meaning (and turning flags into a report) belong to :mod:`lvit.data.describe`
(``ZONES``, ``Findings.from_flags``); this module only maps tensors to logits and does no file I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from .blocks import ConvBNReLU, double_conv

DOWNSAMPLING = 16  # the image side must be a multiple of this


@dataclass
class ReporterConfig:
    """Sizes of a :class:`ZoneClassifier`."""

    image_size: int = 128  # square input side the images are resized to (a multiple of 16)
    in_channels: int = 1  # chest X-rays are gray; colour images are converted (ITU-R 601 luma)
    n_flags: int = 6  # one logit per zone (lvit.data.describe.ZONES order)
    width: int = 16  # channels of the first stage; doubled at each of the next three
    pool_grid: int = 4  # the S/16 feature map is pooled to pool_grid x pool_grid before the MLP
    hidden: int = 64  # MLP hidden units
    dropout: float = 0.2  # before each MLP layer
    mask_head: bool = True  # an auxiliary 1x1 head predicting the lesion mask at S/8 (training only)

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "n_flags", "width", "pool_grid", "hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"reporter config: {name} must be a positive integer, got {value!r}")
        if self.image_size % DOWNSAMPLING:
            raise ConfigError(f"reporter config: image_size must be a multiple of {DOWNSAMPLING}, "
                              f"got {self.image_size}")
        if self.pool_grid > self.image_size // DOWNSAMPLING:
            raise ConfigError(f"reporter config: pool_grid ({self.pool_grid}) must be at most image_size / "
                              f"{DOWNSAMPLING} ({self.image_size // DOWNSAMPLING})")
        if not isinstance(self.mask_head, bool):
            raise ConfigError(f"reporter config: mask_head must be true or false, got {self.mask_head!r}")
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"reporter config: dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReporterConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"reporter config: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"reporter config: unknown key(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ZoneClassifier(nn.Module):
    """``forward(image [B, in_channels, S, S]) -> logits [B, n_flags]``; S = ``config.image_size``."""

    def __init__(self, config: ReporterConfig | None = None):
        super().__init__()
        self.config = cfg = config or ReporterConfig()
        w = cfg.width
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w, kernel_size=3, stride=2, padding=1),  # S/2
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            ConvBNReLU(w, w),
        )
        widths = (w, 2 * w, 4 * w, 8 * w)
        self.stages = nn.Sequential(*(
            nn.Sequential(nn.MaxPool2d(2), double_conv(cin, cout)) for cin, cout in zip(widths, widths[1:])
        ))  # S/4, S/8, S/16
        # Optional pixel-level supervision: lesion-mask logits at S/8 from the third stage's features.
        self.mask_logits = nn.Conv2d(widths[2], 1, kernel_size=1) if cfg.mask_head else None
        self.pool = nn.AdaptiveAvgPool2d(cfg.pool_grid)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
            nn.Linear(widths[-1] * cfg.pool_grid ** 2, cfg.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.n_flags),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_all(image)[0]

    def forward_all(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(flag logits [B, n_flags], mask logits [B, 1, S/8, S/8] or None without a mask head)``."""
        cfg = self.config
        if image.ndim != 4 or image.shape[1] != cfg.in_channels:
            raise ValueError(f"image must be [B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}], "
                             f"got shape {tuple(image.shape)}")
        if tuple(image.shape[-2:]) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"image must be {cfg.image_size} x {cfg.image_size} (the reporter's image_size), "
                             f"got {tuple(image.shape[-2:])}")
        x = self.stages[1](self.stages[0](self.stem(image)))  # S/8
        mask = self.mask_logits(x) if self.mask_logits is not None else None
        return self.head(self.pool(self.stages[2](x))), mask


__all__ = ["ReporterConfig", "ZoneClassifier"]
