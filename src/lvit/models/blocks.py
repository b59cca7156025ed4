"""Convolutional building blocks of LViT's CNN branch and the 1-D projections of its ViT branch.

Names follow what each part does; :mod:`lvit.models.convert` maps the official HUANGLIZI/LViT names
(``ConvBatchNorm``, ``UpblockAttention``, ``PixLevelModule``, ``ConvTransBN``) onto these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (with bias, as the official code) -> BatchNorm2d -> ReLU.

    ``[B, Cin, H, W] -> [B, Cout, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        # In-place is safe: BatchNorm's backward needs its input, not its output.
        self.act = nn.ReLU(inplace=True)


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two ConvBNReLU in a row (the official ``_make_nConv(..., nb_Conv=2)``)."""
    return nn.Sequential(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))


class DownBlock(nn.Module):
    """2x2 max-pool, then two ConvBNReLU. ``[B, Cin, H, W] -> [B, Cout, H/2, W/2]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.convs = double_conv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(self.pool(x))


class PixelLevelAttention(nn.Module):
    """PLAM, the pixel-level attention module gating each skip connection. ``[B, C, H, W] -> [B, C, H, W]``.

    Per pixel: ``a = mean_c ReLU(W_avg x)``, ``m = max_c ReLU(W_max x)`` (1x1 convolutions without bias), the
    three features ``(a, m, a + m)`` go through ``Linear(3, 6) -> ReLU -> Linear(6, 1)``, and the resulting
    per-pixel weight multiplies ``x``.

    The paper describes a sigmoid gate; the official forward (``nets/pixlevel.py``) applies none: the MLP
    output multiplies ``x`` directly, and its ``conv_sig`` (1x1 conv + sigmoid) is instantiated but never
    called. We follow the code, which is what the published weights were trained with, and do not build
    ``conv_sig`` at all.
    """

    def __init__(self, channels: int, hidden: int = 6):
        super().__init__()
        self.conv_avg = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.conv_max = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        avg = F.relu(self.conv_avg(x), inplace=True).mean(dim=1)  # [B, H, W]
        # max_c ReLU(z) == ReLU(max_c z): take the max first and apply ReLU to one channel, not C.
        peak = F.relu(self.conv_max(x).amax(dim=1))  # [B, H, W]
        # Stacking on the last axis gives channels-last features for the Linear layers directly, and the
        # [B, H, W, 1] result has the memory layout of [B, 1, H, W]: no transposes or copies.
        features = torch.stack((avg, peak, avg + peak), dim=-1)  # [B, H, W, 3]
        weight = self.mlp(features).squeeze(-1).unsqueeze(1)  # [B, 1, H, W]
        return x * weight


class UpBlock(nn.Module):
    """Decoder step: nearest 2x upsample, optional PLAM on the skip, concat ``[skip, up]``, two ConvBNReLU.

    ``x [B, Cup, H/2, W/2]``, ``skip [B, Cskip, H, W]`` -> ``[B, Cout, H, W]``. The concatenation order
    (skip first) is the official one and matters for loading the published weights.
    """

    def __init__(self, up_channels: int, skip_channels: int, out_channels: int, attention: bool = True):
        super().__init__()
        self.attention = PixelLevelAttention(skip_channels) if attention else None
        self.convs = double_conv(up_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.attention is not None:
            skip = self.attention(skip)
        return self.convs(torch.cat((skip, up), dim=1))


class ConvTransBN(nn.Module):
    """CTBN: Conv1d (kernel 3, padding 1) -> BatchNorm1d -> ReLU over ``[B, Cin, L] -> [B, Cout, L]``.

    LViT uses it wherever token features change width: to halve a DownViT level's width before it is
    concatenated with the level above, to bring a deeper UpViT level to the width of the next, and (with the
    text tokens as channels) to project the report onto the image patches (:class:`TextToPatchProjection`).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, L]
        return F.relu(self.norm(self.conv(x)), inplace=True)  # [B, Cout, L]

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Apply over the channel axis of a token sequence: ``[B, N, Cin] -> [B, N, Cout]`` (the conv runs along N)."""
        return self(tokens.transpose(1, 2)).transpose(1, 2)


class TextToPatchProjection(nn.Module):
    """Maps the text tokens onto the image patches of ViT level 1 (the official ``downVit.CTBN3``).

    ``text [B, L, C]`` (L report tokens, C = level-1 width after the conv1d chain) is read with the L tokens
    as the Conv1d's channels and the C features as its length, giving one row per patch of the reference
    grid: ``[B, Hg*Wg, C]`` with ``Hg = Wg = image_size / 16`` (196 patches at 224). For another runtime patch
    grid the output is treated as an image on the reference grid and resized bilinearly, so the report's
    spatial layout on the image is kept.
    """

    def __init__(self, text_tokens: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.proj = ConvTransBN(text_tokens, grid[0] * grid[1])

    def forward(self, text: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # [B, L, C]
        patches = self.proj(text)  # [B, Hg*Wg, C]
        if tuple(grid) == self.grid:
            return patches
        b, _, c = patches.shape
        as_map = patches.transpose(1, 2).reshape(b, c, *self.grid)  # [B, C, Hg, Wg]
        as_map = F.interpolate(as_map, size=grid, mode="bilinear", align_corners=False)
        return as_map.flatten(2).transpose(1, 2)  # [B, h*w, C]


class ReportPrior(nn.Module):
    """A report estimated from the image: ``L`` learned queries attend over the bottleneck features and each
    answer is mapped to a text-token embedding (ProLearn's idea of guidance queried by image features, here as
    the stand-in for a missing report).

    ``feats [B, C, h, w]`` (CNN bottleneck) -> ``text [B, L, D]`` in the text encoder's embedding space, so it
    is read by the same text modules as a real report. Trained by the segmentation loss through the no-report
    samples and by :func:`report_prior_loss` towards the true report's embeddings.
    """

    def __init__(self, channels: int, text_tokens: int, text_dim: int, heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(text_tokens, channels) * 0.02)  # [L, C]
        self.norm = nn.LayerNorm(channels)
        self.attend = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.to_text = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, text_dim))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        pixels = self.norm(feats.flatten(2).transpose(1, 2))  # [B, h*w, C]
        queries = self.queries.to(pixels.dtype).unsqueeze(0).expand(pixels.shape[0], -1, -1)  # [B, L, C]
        answer, _ = self.attend(queries, pixels, pixels, need_weights=False)
        return self.to_text(answer + queries)  # [B, L, D]


def report_prior_loss(estimate: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean cosine distance between estimated and true report tokens ``[B, L, D]`` over the real tokens
    (``text_mask [B, L]`` True): 0 when every estimated token points the way of the true one, at most 2."""
    distance = 1.0 - F.cosine_similarity(estimate.float(), text.float(), dim=-1)  # [B, L]
    if text_mask is None:
        return distance.mean()
    weight = text_mask.to(distance.dtype)
    return (distance * weight).sum() / weight.sum().clamp_min(1.0)
