"""Semi-supervised LViT: EPI pseudo labels (paper Eq. 8) and the Language-Vision loss (Eqs. 16-18).

The parts load on first use, so the command line's flags (:mod:`lvit.train.semi.cli`) cost no torch import.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "LabelledSubset": ".labelled_subset",
    "choose_fraction": ".labelled_subset",
    "choose_listed": ".labelled_subset",
    "write_subset": ".labelled_subset",
    "ContrastLabelBank": ".lv_loss",
    "default_contrast_bank": ".lv_loss",
    "default_contrast_folder": ".lv_loss",
    "lv_loss": ".lv_loss",
    "nearest_labelled": ".lv_loss",
    "report_vectors": ".lv_loss",
    "PseudoLabelBank": ".pseudo_labels",
    "gather_updates": ".pseudo_labels",
    "WarmupSampler": ".sampler",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
