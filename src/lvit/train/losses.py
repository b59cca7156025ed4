"""The official supervised loss, computed from logits.

Official (HUANGLIZI/LViT ``utils.WeightedDiceBCE(dice_weight=0.5, BCE_weight=0.5)``, applied to sigmoid
probabilities p and targets t):

* ``WeightedDiceLoss(weights=[0.5, 0.5])``: per sample, with w = 0.5 everywhere,
  ``1 - (2 sum(wp*wt) + 1e-5) / (sum((wp)^2) + sum((wt)^2) + 1e-5)``, averaged over the batch. The constant
  weight only rescales the smoothing term: it equals the squared-denominator soft Dice
  ``1 - (2 sum(pt) + 4e-5) / (sum(p^2) + sum(t^2) + 4e-5)``, which is MONAI's ``DiceLoss(sigmoid=True,
  squared_pred=True, batch=False, smooth_nr=smooth_dr=4e-5)``.
* ``WeightedBCE(weights=[0.5, 0.5])``: over all pixels of the batch, the BCE of positive pixels averaged
  over the positives and of negative pixels averaged over the negatives, mixed 0.5/0.5 (so a small lesion
  weighs as much as the background).

We take logits and use ``binary_cross_entropy_with_logits`` (log-sum-exp, no log(0)); the official code
applies ``F.binary_cross_entropy`` to probabilities, which clamps the log at -100 - identical wherever the
loss is finite.

:func:`distillation_loss` is lvit's: it pulls the no-report answer towards the same network's answer with the
report (``loss.distill_weight``; docs/REPORT_OPTIONAL.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

# The official smoothing (1e-5) applied to the 0.5-weighted terms equals 4e-5 on the unweighted ones.
OFFICIAL_DICE_SMOOTH = 4e-5


class BalancedBCEWithLogitsLoss(nn.Module):
    """Class-balanced BCE: ``w_pos * mean(BCE over positives) + w_neg * mean(BCE over negatives)``.

    Pooled over the whole batch, as in the official ``WeightedBCE``. A batch without positives (or without
    negatives) contributes only its other term.
    """

    def __init__(self, pos_weight: float = 0.5, neg_weight: float = 0.5):
        super().__init__()
        self.pos_weight = pos_weight
        self.neg_weight = neg_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logits, target: [B, 1, H, W]
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
        pos = (target > 0.5).float()
        neg = 1.0 - pos
        pos_term = (bce * pos).sum() / (pos.sum() + 1e-12)
        neg_term = (bce * neg).sum() / (neg.sum() + 1e-12)
        return self.pos_weight * pos_term + self.neg_weight * neg_term


class DiceBCELoss(nn.Module):
    """``dice_weight * soft Dice (squared denominators) + bce_weight * class-balanced BCE``, from logits."""

    def __init__(self, dice_weight: float = 0.5, bce_weight: float = 0.5):
        super().__init__()
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.dice = DiceLoss(
            sigmoid=True,
            squared_pred=True,
            batch=False,  # one Dice per image, then the mean (official)
            smooth_nr=OFFICIAL_DICE_SMOOTH,
            smooth_dr=OFFICIAL_DICE_SMOOTH,
            reduction="mean",
        )
        self.bce = BalancedBCEWithLogitsLoss(0.5, 0.5)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logits: [B, 1, H, W] (any float dtype: computed in float32); target: [B, 1, H, W] in {0, 1}
        logits = logits.float()
        target = target.float()
        return self.dice_weight * self.dice(logits, target) + self.bce_weight * self.bce(logits, target)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel KL divergence ``KL(teacher || student)`` of two Bernoulli maps given as logits
    ``[N, 1, H, W]``: 0 where the student gives the teacher's probabilities, and only the student gets gradients.
    Written as BCE(student, p) - BCE(teacher, p) with ``p = sigmoid(teacher)`` (the teacher's entropy removed), so
    it is stable for any logits."""
    teacher_logits = teacher_logits.detach().float()
    target = torch.sigmoid(teacher_logits)
    cross = F.binary_cross_entropy_with_logits(student_logits.float(), target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits, target, reduction="none")
    return (cross - entropy).mean()
