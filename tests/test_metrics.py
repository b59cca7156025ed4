"""Dice/IoU per image and pooled, on hand-computed cases including empty masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvit.core.metrics import SegmentationScores, batch_dice_iou, dice_iou


def m(rows: list[str]) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


def test_hand_computed_overlap():
    pred = m(["##..", "##..", "....", "...."])  # 4 px
    gt = m([".##.", ".##.", "....", "...."])  # 4 px, overlap 2
    dice, iou = dice_iou(pred, gt)
    assert dice == pytest.approx(2 * 2 / (4 + 4))
    assert iou == pytest.approx(2 / 6)


def test_empty_mask_convention():
    empty = m(["...", "..."])
    some = m(["#..", "..."])
    assert dice_iou(empty, empty) == (1.0, 1.0)  # both empty: a correct "nothing there"
    assert dice_iou(some, empty) == (0.0, 0.0)  # false alarm
    assert dice_iou(empty, some) == (0.0, 0.0)  # missed lesion
    assert dice_iou(some, some) == (1.0, 1.0)


def test_batch_version_agrees_with_per_image():
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(5, 1, 8, 8, generator=g) > 0.5
    gt = torch.rand(5, 1, 8, 8, generator=g) > 0.6
    pred[3] = False
    gt[3] = False  # both empty
    gt[4] = False  # false alarm only
    dice, iou = batch_dice_iou(pred, gt)
    for i in range(5):
        d, j = dice_iou(pred[i], gt[i])
        assert dice[i].item() == pytest.approx(d) and iou[i].item() == pytest.approx(j)
    assert dice[3].item() == 1.0 and dice[4].item() == 0.0


def test_mean_over_images_vs_dataset_level():
    scores = SegmentationScores()
    # image a: large lesion, perfectly found (tp 8); image b: small lesion, half found (tp 1, fn 1, fp 1)
    scores.add("a", m(["####", "####"]), m(["####", "####"]))
    scores.add("b", m(["#.#.", "...."]), m(["##..", "...."]))
    s = scores.summary()
    assert s["n_images"] == 2
    assert s["mean_over_images"]["dice"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["mean_over_images"]["iou"] == pytest.approx((1.0 + 1 / 3) / 2)
    # pooled: tp 9, fp 1, fn 1
    assert s["dataset_level"]["dice"] == pytest.approx(18 / 20)
    assert s["dataset_level"]["iou"] == pytest.approx(9 / 11)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice_iou(np.zeros((2, 2)), np.zeros((3, 3)))
