"""lvit: language-guided medical image segmentation (LViT, Li et al., IEEE TMI 2023)."""

__version__ = "0.1.0"
