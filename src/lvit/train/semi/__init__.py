"""Semi-supervised LViT: EPI pseudo labels (paper Eq. 8) and the Language-Vision loss (Eqs. 16-18); lvit's
mean-teacher recipe (:mod:`.mean_teacher`, imported on use: it needs Lightning)."""

from .labelled_subset import (
    LabelledSubset,
    choose_fraction,
    choose_listed,
    write_subset,
)
from .lv_loss import (
    ContrastLabelBank,
    default_contrast_bank,
    default_contrast_folder,
    lv_loss,
    nearest_labelled,
    report_vectors,
)
from .pseudo_labels import PseudoLabelBank, gather_updates
from .sampler import PairedSampler, WarmupSampler

__all__ = [
    "ContrastLabelBank",
    "LabelledSubset",
    "PairedSampler",
    "PseudoLabelBank",
    "WarmupSampler",
    "choose_fraction",
    "choose_listed",
    "default_contrast_bank",
    "default_contrast_folder",
    "gather_updates",
    "lv_loss",
    "nearest_labelled",
    "report_vectors",
    "write_subset",
]
