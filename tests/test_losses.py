"""The official loss (0.5 weighted soft Dice + 0.5 class-balanced BCE) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lvit.train.losses import BalancedBCEWithLogitsLoss, DiceBCELoss


def official_weighted_dice_bce(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """utils.WeightedDiceBCE(0.5, 0.5) of the official code, re-derived from its formulas (probabilities in)."""
    b = prob.shape[0]
    p, t = prob.reshape(b, -1), target.reshape(b, -1)
    w = t * (0.5 - 0.5) + 0.5  # WeightedDiceLoss(weights=[0.5, 0.5])
    pw, tw = w * p, w * t
    dice = 1 - (2 * (pw * tw).sum(-1) + 1e-5) / ((pw * pw).sum(-1) + (tw * tw).sum(-1) + 1e-5)
    bce = F.binary_cross_entropy(prob.reshape(-1), target.reshape(-1), reduction="none")
    pos, neg = (target.reshape(-1) > 0.5).float(), (target.reshape(-1) < 0.5).float()
    wbce = (0.5 * pos * bce / (pos.sum() + 1e-12) + 0.5 * neg * bce / (neg.sum() + 1e-12)).sum()
    return 0.5 * dice.mean() + 0.5 * wbce


def test_hand_computed_single_image():
    # logits 0 -> p = 0.5 everywhere; one positive pixel out of four.
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # Dice: sum(pt) = 0.5, sum(p^2) = 1, sum(t^2) = 1 -> 1 - (1 + 4e-5) / (2 + 4e-5)
    dice = 1 - (1 + 4e-5) / (2 + 4e-5)
    # BCE: ln 2 on every pixel; positives' mean ln2, negatives' mean ln2 -> 0.5 ln2 + 0.5 ln2
    bce = math.log(2)
    assert DiceBCELoss()(logits, target).item() == pytest.approx(0.5 * dice + 0.5 * bce, rel=1e-6)


def test_balanced_bce_weighs_classes_equally():
    logits = torch.tensor([[[[2.0, -1.0, 0.5, -3.0]]]])
    target = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    sp = lambda x: math.log1p(math.exp(x))  # softplus: BCE(logit, 0) = softplus(x), BCE(logit, 1) = softplus(-x)
    expected = 0.5 * sp(-2.0) + 0.5 * (sp(-1.0) + sp(0.5) + sp(-3.0)) / 3
    assert BalancedBCEWithLogitsLoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # No positives at all: only the negative term remains.
    empty = torch.zeros_like(target)
    expected_empty = 0.5 * (sp(2.0) + sp(-1.0) + sp(0.5) + sp(-3.0)) / 4
    assert BalancedBCEWithLogitsLoss()(logits, empty).item() == pytest.approx(expected_empty, rel=1e-6)


def test_matches_official_formulas_on_random_batches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=g) * 3
    target = (torch.rand(3, 1, 16, 16, generator=g) > 0.7).float()
    target[2] = 0  # an image without foreground
    ours = DiceBCELoss()(logits, target)
    theirs = official_weighted_dice_bce(torch.sigmoid(logits), target)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_extreme_logits_stay_finite_and_differentiable():
    logits = torch.tensor([[[[200.0, -200.0], [50.0, -80.0]]]], requires_grad=True)
    target = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    loss = DiceBCELoss()(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() > 50  # confidently wrong: BCE-with-logits is not clamped at 100 like BCE on probabilities
