"""LViT: a U-shaped CNN and a U-shaped ViT branch, joined level by level, with the report fed into the ViT.

Read against the official HUANGLIZI/LViT code (``nets/LViT.py``, ``nets/Vit.py``, ``nets/pixlevel.py``) and
Li et al., IEEE TMI 2023. Only the modules the official forward pass calls are built: 29,908,033 parameters at
the default configuration (the official class instantiates 39.9M, 10.0M of which never run).

Shapes at the default configuration (b = base_channels = 64, 224x224, patch grid 14x14 = 196):

    image [B, 3, 224, 224]
      CNN encoder  x1 [B, b, 224]  x2 [B, 2b, 112]  x3 [B, 4b, 56]  x4 [B, 8b, 28]  x5 [B, 8b, 14]
      text [B, 10, D] -conv1d chain-> [B, 10, b] -CTBN (tokens as channels)-> [B, 196, b]
      DownViT  y1 = blocks(embed16(x1) + text)                       [B, 196, b]
               y_i = cat(CTBN(blocks(embed(x_i))), y_{i-1})          [B, 196, b*2^(i-1)]
      UpViT    y4 = blocks(y4);  y_i = blocks(y_i) + CTBN(y_{i+1})
      x_i += Reconstruct(y_i)  (tokens -> grid -> 1x1 conv-BN-ReLU -> nearest upsample to x_i)
      CNN decoder  up(x5, PLAM(x4)) ... up(., PLAM(x1)) -> 1x1 head -> logits [B, n_classes, 224, 224]
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from .blocks import ConvBNReLU, DownBlock, ReportPrior, TextToPatchProjection, UpBlock, report_prior_loss
from .pretrained import PretrainedMixin
from .registry import register_model
from .vit import DownViTLevel, Reconstruct, UpViTLevel

#: The CNN downsamples four times and ViT level 1 uses 16x16 patches; we ask for multiples of 32 so every
#: stage (and resizing pipelines upstream) work on whole numbers with margin.
SIZE_MULTIPLE = 32
PATCH_SIZES = (16, 8, 4, 2)  # per ViT level; the CNN stride of level i is 2**(i-1), so all grids are H/16


#: Upper bounds of the size fields, far above any sensible LViT (the paper: 224 px, width 64, depth 1, 8 heads,
#: 10 tokens of 768-d BERT) and far below sizes that would exhaust memory.
LIMITS = {"image_size": 4096, "in_channels": 16, "n_classes": 256, "base_channels": 512, "text_dim": 8192,
          "text_tokens": 512, "vit_depth": 64, "vit_heads": 64, "mlp_ratio": 16.0}


@dataclass
class LViTConfig:
    """Sizes of an LViT (and of the U-Net baseline, which reads the fields it needs)."""

    image_size: int = 224  # reference size: sets the learned patch grid (image_size/16)^2
    in_channels: int = 3
    n_classes: int = 1
    base_channels: int = 64  # CNN widths b, 2b, 4b, 8b, 8b; ViT level widths b, 2b, 4b, 8b
    text_dim: int = 768  # D of the token embeddings (768 BERT-base as the paper, 384 our MiniLM)
    text_tokens: int = 10  # L, report tokens kept (the official code keeps 10)
    vit_depth: int = 1  # transformer blocks per ViT level
    vit_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1  # embedding and MLP dropout, as the official code
    use_text: bool = True  # False: LViT-T, the text-free ablation (no text modules at all)
    # > 0: the model also answers without a report. A learned "no report" token sequence [L, D] stands in for the
    # report of each training sample with this probability (like dropout, only in train mode), and for every
    # sample whose report is missing at inference (text=None, or no_report[i] True).
    report_dropout: float = 0.0
    # With report dropout: the stand-in for a missing report is estimated from the image (a ReportPrior over the
    # CNN bottleneck, trained towards the true report's embeddings) instead of one learned token sequence.
    report_prior: bool = False

    def __post_init__(self) -> None:
        for name in ("image_size", "in_channels", "n_classes", "base_channels", "text_dim", "text_tokens",
                     "vit_depth", "vit_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model config: {name} must be a positive integer, got {value!r}")
            if value > LIMITS[name]:  # a damaged or hostile config.json must not reach a huge allocation
                raise ConfigError(f"model config: {name} must be at most {LIMITS[name]:,}, got {value:,}")
        if isinstance(self.mlp_ratio, int | float) and float(self.mlp_ratio) > LIMITS["mlp_ratio"]:
            raise ConfigError(f"model config: mlp_ratio must be at most {LIMITS['mlp_ratio']}, got {self.mlp_ratio}")
        if self.image_size % SIZE_MULTIPLE:
            raise ConfigError(f"model config: image_size must be a multiple of {SIZE_MULTIPLE}, got {self.image_size}")
        if self.base_channels % self.vit_heads:
            raise ConfigError(f"model config: base_channels ({self.base_channels}) must be divisible by "
                              f"vit_heads ({self.vit_heads})")
        if self.base_channels % 2:
            raise ConfigError(f"model config: base_channels must be even, got {self.base_channels}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if float(self.mlp_ratio) <= 0:
            raise ConfigError(f"model config: mlp_ratio must be positive, got {self.mlp_ratio}")
        if not isinstance(self.use_text, bool):
            raise ConfigError(f"model config: use_text must be true or false, got {self.use_text!r}")
        if isinstance(self.report_dropout, bool) or not isinstance(self.report_dropout, int | float) \
                or not 0.0 <= float(self.report_dropout) < 1.0:
            raise ConfigError(f"model config: report_dropout must be in [0, 1), got {self.report_dropout!r}")
        if self.report_dropout and not self.use_text:
            raise ConfigError("model config: report_dropout needs use_text=true (a text-free model has no report "
                              "to drop)")
        if not isinstance(self.report_prior, bool):
            raise ConfigError(f"model config: report_prior must be true or false, got {self.report_prior!r}")
        if self.report_prior and not self.report_dropout:
            raise ConfigError("model config: report_prior needs report_dropout > 0 (the prior stands in for the "
                              "reports that dropout removes)")

    @property
    def has_no_report_path(self) -> bool:
        """Whether the model answers without a report (trained with report dropout)."""
        return self.use_text and float(self.report_dropout) > 0.0

    @property
    def grid(self) -> tuple[int, int]:
        """The reference patch grid (14x14 at 224)."""
        side = self.image_size // PATCH_SIZES[0]
        return (side, side)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_image(image: torch.Tensor, in_channels: int) -> None:
    """Raise ValueError unless ``image`` is ``[B, in_channels, H, W]`` with H, W multiples of 32."""
    if image.ndim != 4:
        raise ValueError(f"image must be [B, C, H, W] with C={in_channels}, got shape {tuple(image.shape)}")
    if image.shape[1] != in_channels:
        raise ValueError(f"image has {image.shape[1]} channels, expected {in_channels} (shape {tuple(image.shape)})")
    h, w = image.shape[-2:]
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE or h == 0 or w == 0:
        raise ValueError(f"image height and width must be positive multiples of {SIZE_MULTIPLE}, got {h}x{w}")


class LViT(PretrainedMixin, nn.Module):
    """LViT (``use_text=True``) or LViT-T (``use_text=False``). ``forward`` returns logits (no sigmoid).
    ``save_pretrained(folder)`` / ``LViT.from_pretrained(folder)``: :mod:`lvit.models.pretrained`."""

    pretrained_names = ("lvit", "lvit-t")
    config_class = LViTConfig

    def __init__(self, config: LViTConfig | None = None):
        super().__init__()
        self.config = cfg = config or LViTConfig()
        b = cfg.base_channels
        widths = (b, 2 * b, 4 * b, 8 * b)  # CNN level i == ViT level i
        vit = {"depth": cfg.vit_depth, "num_heads": cfg.vit_heads, "mlp_ratio": cfg.mlp_ratio, "dropout": cfg.dropout}

        # CNN encoder: x1 [b, H] .. x4 [8b, H/8], bottleneck x5 [8b, H/16].
        self.stem = ConvBNReLU(cfg.in_channels, b)
        self.down = nn.ModuleList(DownBlock(cin, cout) for cin, cout in zip(widths, (*widths[1:], widths[-1])))

        # Text: conv1d chain over the tokens, D -> 8b -> 4b -> 2b -> b (official text_module4..1; plain convs,
        # no BN/ReLU), then the tokens-as-channels projection onto the level-1 patches. The official forward
        # computes text2..text4 and passes them to the deeper levels, which ignore them: only the level-1 text
        # (the end of the chain) is read, so the chain's intermediate outputs feed nothing else.
        if cfg.use_text:
            chain = (cfg.text_dim, *reversed(widths))
            self.text_convs = nn.ModuleList(
                nn.Conv1d(cin, cout, kernel_size=3, padding=1) for cin, cout in itertools.pairwise(chain))
            self.text_to_patches = TextToPatchProjection(cfg.text_tokens, cfg.grid)
        else:
            self.text_convs = None
            self.text_to_patches = None
        # The stand-in for a missing report, read through the same text chain as a real one: learned tokens
        # [L, D], or tokens estimated from the image's bottleneck features (report_prior).
        self.no_report_text = nn.Parameter(torch.zeros(cfg.text_tokens, cfg.text_dim)) \
            if cfg.has_no_report_path and not cfg.report_prior else None
        self.report_prior = ReportPrior(widths[-1], cfg.text_tokens, cfg.text_dim, cfg.vit_heads) \
            if cfg.has_no_report_path and cfg.report_prior else None

        # ViT branch: same patch grid at every level.
        self.vit_down = nn.ModuleList(
            DownViTLevel(w, p, cfg.grid, takes_skip=i > 0, **vit) for i, (w, p) in enumerate(zip(widths, PATCH_SIZES)))
        self.vit_up = nn.ModuleList(UpViTLevel(w, takes_deeper=i < 3, **vit) for i, w in enumerate(widths))
        self.reconstruct = nn.ModuleList(Reconstruct(w, w) for w in widths)

        # CNN decoder, level i takes the level below (x5 for level 4) and the ViT-enriched x_i via PLAM.
        ups = (b, b, 2 * b, 4 * b)  # channels coming up into level i (up1..up4 output b, b, 2b, 4b)
        self.up = nn.ModuleList(
            UpBlock(up_ch, skip_ch, out_ch)
            for up_ch, skip_ch, out_ch in zip((b, 2 * b, 4 * b, 8 * b), widths, ups))
        self.head = nn.Conv2d(b, cfg.n_classes, kernel_size=1)

    # ------------------------------------------------------------------------------------------------------
    def _check_text(self, image: torch.Tensor, text: torch.Tensor | None,
                    text_mask: torch.Tensor | None) -> None:
        cfg = self.config
        expected = f"[B={image.shape[0]}, L={cfg.text_tokens}, D={cfg.text_dim}]"
        if text is None:
            raise ValueError(f"LViT with use_text=True needs text {expected}; got None (this model was trained "
                             "without report dropout, so it has no no-report path; LViT-T is the text-free model)")
        if text.ndim != 3 or tuple(text.shape) != (image.shape[0], cfg.text_tokens, cfg.text_dim):
            raise ValueError(f"text must be {expected}, got shape {tuple(text.shape)}")
        if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must be [B={text.shape[0]}, L={text.shape[1]}], "
                             f"got shape {tuple(text_mask.shape)}")

    def encode_text(self, text: torch.Tensor, text_mask: torch.Tensor | None,
                    grid: tuple[int, int]) -> torch.Tensor:
        """``text [B, L, D]`` (+ mask ``[B, L]``, True = real token) -> level-1 text patches ``[B, h*w, b]``."""
        if text_mask is not None:
            # Padded tokens contribute nothing (kernel-3 convs would otherwise mix them into real ones).
            text = text * text_mask.unsqueeze(-1).to(text.dtype)
        feats = text.transpose(1, 2)  # [B, D, L]: the conv1d chain runs along the tokens
        for conv in self.text_convs:
            feats = conv(feats)
        return self.text_to_patches(feats.transpose(1, 2), grid)  # [B, L, b] -> [B, h*w, b]

    def with_no_report(self, stand_in: torch.Tensor, text: torch.Tensor | None, text_mask: torch.Tensor | None,
                       no_report: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text the network reads: ``stand_in [1 or B, L, D]`` where ``no_report [B]`` is True (every sample
        when ``text`` is None), the report elsewhere. In train mode without ``no_report`` each report is replaced
        with probability ``report_dropout``; a trainer that passes ``no_report`` chooses the rows itself (to
        distil the report's answer into exactly those)."""
        batch = stand_in.shape[0] if text is None else text.shape[0]
        device = stand_in.device
        if text is None:
            mask = torch.ones(batch, self.config.text_tokens, dtype=torch.bool, device=device)
            return stand_in.expand(batch, -1, -1), mask
        drop = torch.zeros(batch, dtype=torch.bool, device=device) if no_report is None \
            else no_report.to(device=device, dtype=torch.bool)
        if self.training and no_report is None:
            drop = torch.rand(batch, device=device) < float(self.config.report_dropout)
        elif no_report is None:
            return text, text_mask  # evaluation with every report given
        # No branch on drop.any(): reading it back would stop at every training step for the host (and break
        # torch.compile's graph and CUDA graphs); a row that keeps its report comes out of where() unchanged.
        text = torch.where(drop[:, None, None], stand_in, text.to(stand_in.dtype))
        if text_mask is not None:
            text_mask = text_mask | drop[:, None]
        return text, text_mask

    def forward(self, image: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, no_report: torch.Tensor | None = None) -> torch.Tensor:
        """``image [B, C, H, W]`` (H, W multiples of 32), ``text [B, L, D]``, ``text_mask [B, L]`` bool
        -> logits ``[B, n_classes, H, W]``. LViT-T ignores ``text`` and ``text_mask``. A model trained with
        report dropout also takes ``text=None`` (no reports) or ``no_report [B]`` bool (these samples have none)."""
        return self.forward_with_aux(image, text, text_mask, no_report)[0]

    def forward_with_aux(self, image: torch.Tensor, text: torch.Tensor | None = None,
                         text_mask: torch.Tensor | None = None, no_report: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`forward` and the auxiliary losses the training adds: ``{"report_prior": cosine distance of the
        image's estimated report to the true one}`` when the model has a report prior, a report is given and the
        model is in train mode; else ``{}``."""
        check_image(image, self.config.in_channels)
        grid = (image.shape[-2] // PATCH_SIZES[0], image.shape[-1] // PATCH_SIZES[0])
        feats = [self.stem(image)]  # x1..x5: the CNN encoder does not read the report
        for down in self.down:
            feats.append(down(feats[-1]))

        aux: dict[str, torch.Tensor] = {}
        text_patches = None
        if self.config.use_text:
            if self.config.has_no_report_path:
                if self.report_prior is not None:
                    stand_in = self.report_prior(feats[-1])  # [B, L, D]
                    if self.training and text is not None:
                        aux["report_prior"] = report_prior_loss(stand_in, text, text_mask)
                else:
                    stand_in = self.no_report_text.to(image.dtype).unsqueeze(0)  # [1, L, D]
                if text is None and stand_in.shape[0] == 1:
                    stand_in = stand_in.expand(image.shape[0], -1, -1)
                text, text_mask = self.with_no_report(stand_in, text, text_mask, no_report)
            elif no_report is not None and bool(no_report.any()):
                raise ValueError("this LViT has no no-report path (trained without report dropout)")
            self._check_text(image, text, text_mask)
            text_patches = self.encode_text(text.to(image.dtype), text_mask, grid)

        tokens: list[torch.Tensor] = []  # y1..y4, each [B, h*w, width_i]
        for level, vit in enumerate(self.vit_down):
            previous = tokens[-1] if tokens else None
            tokens.append(vit(feats[level], previous, text_patches if level == 0 else None))
        deeper = None
        for level in reversed(range(len(self.vit_up))):
            deeper = tokens[level] = self.vit_up[level](tokens[level], deeper)

        x = feats[-1]
        for level in reversed(range(len(self.up))):
            skip = feats[level]
            # The interpolated map is a fresh tensor no backward needs: add the CNN features in place.
            enriched = self.reconstruct[level](tokens[level], grid, skip.shape[-2:]).add_(skip)
            x = self.up[level](x, enriched)
        return self.head(x), aux


@register_model("lvit", reads_text=True, summary="LViT: CNN + ViT double U guided by the report (paper)")
def _lvit(config: LViTConfig | None) -> LViT:
    return LViT(config)


@register_model("lvit-t", reads_text=False, summary="LViT without text (use_text=False): the paper's ablation")
def _lvit_t(config: LViTConfig | None) -> LViT:
    return LViT(dataclasses.replace(config or LViTConfig(), use_text=False))
