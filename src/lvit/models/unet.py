"""U-Net baseline with LViT's interface, so one harness trains and compares LViT, LViT-T and U-Net.

Our own code following the official baseline (HUANGLIZI/LViT ``nets/UNet.py``, which produced the paper's
U-Net figures): the widths of LViT's CNN branch (b, 2b, 4b, 8b, 8b), Conv-BN-ReLU blocks, 2x2 transposed
convolutions for upsampling and ``[up, skip]`` concatenation, no ViT branch, no PLAM, no text. We keep it
rather than MONAI's ``BasicUNet`` because that one has other widths, norms and activations, and the point of
the baseline is to reproduce the published comparison.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBNReLU, DownBlock, double_conv
from .lvit import LViTConfig, check_image
from .pretrained import PretrainedMixin
from .registry import register_model


class UNetUpBlock(nn.Module):
    """Transposed-conv 2x upsample (keeps the width), concat ``[up, skip]``, two ConvBNReLU."""

    def __init__(self, up_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(up_channels, up_channels, kernel_size=2, stride=2)
        self.convs = double_conv(up_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat((self.upsample(x), skip), dim=1))


class UNet(PretrainedMixin, nn.Module):
    """``forward(image [B, C, H, W], text=None, text_mask=None) -> logits [B, n_classes, H, W]``; text ignored.
    ``save_pretrained(folder)`` / ``UNet.from_pretrained(folder)``: :mod:`lvit.models.pretrained`."""

    pretrained_names = ("unet",)
    config_class = LViTConfig

    def __init__(self, config: LViTConfig | None = None):
        super().__init__()
        self.config = cfg = config or LViTConfig()
        b = cfg.base_channels
        widths = (b, 2 * b, 4 * b, 8 * b)
        self.stem = ConvBNReLU(cfg.in_channels, b)
        self.down = nn.ModuleList(DownBlock(cin, cout) for cin, cout in zip(widths, (*widths[1:], widths[-1])))
        self.up = nn.ModuleList(
            UNetUpBlock(up_ch, skip_ch, out_ch)
            for up_ch, skip_ch, out_ch in zip(widths, widths, (b, b, 2 * b, 4 * b)))
        self.head = nn.Conv2d(b, cfg.n_classes, kernel_size=1)

    def forward(self, image: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_image(image, self.config.in_channels)
        feats = [self.stem(image)]
        for down in self.down:
            feats.append(down(feats[-1]))
        x = feats[-1]
        for level in reversed(range(len(self.up))):
            x = self.up[level](x, feats[level])
        return self.head(x)


@register_model("unet", reads_text=False, summary="U-Net baseline (official nets/UNet.py widths)")
def _unet(config: LViTConfig | None) -> UNet:
    return UNet(config)
