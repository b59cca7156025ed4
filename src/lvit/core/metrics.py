"""Segmentation metrics: Dice and IoU of binary masks, per image and pooled over a dataset.

Conventions (documented in docs/TRAINING.md):

* Predictions are binarised at probability 0.5 (``sigmoid(logit) >= 0.5``), as in the official test code.
* Per image: ``dice = 2|P∩G| / (|P| + |G|)`` and ``iou = |P∩G| / |P∪G|``. **Empty convention**: when the
  ground truth and the prediction are both empty, Dice = IoU = 1 (a correct "nothing there"); when only one
  is empty, both are 0. (The official ``test_model.py`` adds 1e-5 to the Dice denominator, which gives 0 for
  the both-empty case; its datasets have no empty masks, so the figures agree.)
* ``mean_over_images``: the mean of the per-image values - what the paper reports (official
  ``test_model.py`` sums per-image Dice/IoU and divides by the number of test images).
* ``dataset_level``: Dice/IoU of the pooled counts (all pixels of all images as one mask), which weighs
  large lesions more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def _counts(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of two binary masks of the same shape."""
    if isinstance(pred, torch.Tensor):
        pred = pred.detach().cpu().numpy()
    if isinstance(target, torch.Tensor):
        target = target.detach().cpu().numpy()
    pred = np.asarray(pred).astype(bool)
    target = np.asarray(target).astype(bool)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
    tp = int(np.count_nonzero(pred & target))
    fp = int(np.count_nonzero(pred & ~target))
    fn = int(np.count_nonzero(~pred & target))
    return tp, fp, fn


def dice_iou_from_counts(tp: int | float, fp: int | float, fn: int | float) -> tuple[float, float]:
    """Dice and IoU from pixel counts; both empty (tp = fp = fn = 0) -> (1.0, 1.0)."""
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2.0 * tp / (2.0 * tp + fp + fn), tp / (tp + fp + fn)


def dice_iou(pred_bin, target_bin) -> tuple[float, float]:
    """Dice and IoU of one binary prediction against one binary ground truth (arrays or tensors)."""
    return dice_iou_from_counts(*_counts(pred_bin, target_bin))


def batch_counts(pred_bin: torch.Tensor, target_bin: torch.Tensor) -> torch.Tensor:
    """Per-image (tp, fp, fn) of binary masks ``[B, 1, H, W]`` -> ``[B, 3]`` float64 counts."""
    pred = pred_bin.bool().flatten(1)  # [B, H*W]
    target = target_bin.bool().flatten(1)
    tp = (pred & target).sum(1)
    fp = (pred & ~target).sum(1)
    fn = (~pred & target).sum(1)
    return torch.stack([tp, fp, fn], dim=1).double()


def batch_dice_iou(pred_bin: torch.Tensor, target_bin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU ``[B]`` of binary masks ``[B, 1, H, W]`` (empty convention as above)."""
    counts = batch_counts(pred_bin, target_bin)
    tp, fp, fn = counts.unbind(1)
    denom_dice = 2 * tp + fp + fn
    denom_iou = tp + fp + fn
    empty = denom_iou == 0
    dice = torch.where(empty, torch.ones_like(tp), 2 * tp / denom_dice.clamp_min(1))
    iou = torch.where(empty, torch.ones_like(tp), tp / denom_iou.clamp_min(1))
    return dice, iou


@dataclass
class SegmentationScores:
    """Accumulates per-image Dice/IoU and pooled counts; ``summary()`` gives both kinds of figure."""

    names: list[str] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    tp: float = 0.0
    fp: float = 0.0
    fn: float = 0.0

    def add(self, name: str, pred_bin, target_bin) -> tuple[float, float]:
        tp, fp, fn = _counts(pred_bin, target_bin)
        d, i = dice_iou_from_counts(tp, fp, fn)
        self.names.append(name)
        self.dice.append(d)
        self.iou.append(i)
        self.tp += tp
        self.fp += fp
        self.fn += fn
        return d, i

    def summary(self) -> dict:
        pooled_dice, pooled_iou = dice_iou_from_counts(self.tp, self.fp, self.fn)
        n = len(self.dice)
        return {
            "n_images": n,
            "mean_over_images": {
                "dice": float(np.mean(self.dice)) if n else float("nan"),
                "iou": float(np.mean(self.iou)) if n else float("nan"),
            },
            "dataset_level": {"dice": pooled_dice, "iou": pooled_iou},
        }
