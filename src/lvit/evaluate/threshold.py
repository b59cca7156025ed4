"""``lvit calibrate``: the mask threshold that scores best on validation images, chosen once per model.

A network trained with Dice + BCE need not be best cut at probability 0.5 (the official test code's choice).
:func:`calibrate` scores one forward pass per validation image at every candidate threshold (the probability map
resized to the mask's own size once, then cut at each value; per-image Dice, the paper's figure) and keeps the
best; ties go to the candidate nearest 0.5. The test split never takes part. The record is stored with the model
(:mod:`lvit.artifacts.threshold`) and used by ``lvit predict``, ``lvit test``, ``lvit explain`` and ``lvit app``
unless they are given ``--threshold``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

CANDIDATES = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


def dice_per_threshold(prob: np.ndarray, truth: np.ndarray, thresholds=CANDIDATES) -> list[float]:
    """Dice of ``prob >= t`` against the boolean ``truth`` for each ``t`` (both empty: 1, as lvit's metrics)."""
    n_truth = int(truth.sum())
    out = []
    for t in thresholds:
        pred = prob >= t
        total = int(pred.sum()) + n_truth
        out.append(1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total)
    return out


def sweep(segmenter, records, reports: str = "true", thresholds=CANDIDATES, batch_size: int = 32,
          progress: Callable[[int, int], None] | None = None) -> list[float]:
    """Mean per-image Dice at the masks' original size at each threshold, over ``records`` (with masks).
    ``reports``: "true" (each record's report) or "none" (the model's no-report path)."""
    import torch

    from ..data import load_pair
    from ..inference import to_original_size

    scores = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        pairs = [load_pair(r, segmenter.in_channels) for r in chunk]
        images = torch.stack([segmenter.preprocess(image) for image, _ in pairs])  # [B, C, S, S]
        texts = [r.text for r in chunk] if reports == "true" and segmenter.uses_text else None
        logits = segmenter.logits(images, *segmenter.text_for(texts, len(chunk)))  # [B, 1, S, S]
        for k, (image, truth) in enumerate(pairs):
            prob = to_original_size(logits[k:k + 1], image.shape[:2])[0, 0].numpy()  # [H, W] probabilities
            scores.append(dice_per_threshold(prob, truth > 0, thresholds))
        if progress is not None:
            progress(len(scores), len(records))
    return [float(v) for v in np.mean(np.asarray(scores, dtype=np.float64), axis=0)]


def choose(dice: list[float], thresholds=CANDIDATES) -> float:
    """The threshold with the best Dice; ties go to the one nearest 0.5."""
    best = max(dice)
    return min((t for t, d in zip(thresholds, dice) if d == best), key=lambda t: abs(t - 0.5))


def calibrate(segmenter, data_root: str | Path, split: str = "val", reports: str = "true",
              batch_size: int = 32, progress: Callable[[int, int], None] | None = None) -> dict:
    """The threshold record (:mod:`lvit.artifacts.threshold`) of the segmenter's weights on ``split``."""
    from ..artifacts.threshold import file_sha256
    from ..core.errors import ConfigError, DataError
    from ..data import load_split

    if split == "test":
        raise ConfigError("lvit calibrate chooses on validation data: the test split would then no longer be a test")
    if reports == "none" and segmenter.uses_text and not segmenter.has_no_report_path:
        raise ConfigError(f"--reports none: the model of {segmenter.source} has no no-report path")
    records = [r for r in load_split(data_root, split) if r.mask_path is not None]
    if not records:
        raise DataError(data_root, f"no {split} images with masks: nothing to choose a threshold on")
    dice = sweep(segmenter, records, reports, CANDIDATES, batch_size, progress)
    chosen = choose(dice)
    return {"threshold": chosen, "split": split, "n_images": len(records), "reports": reports,
            "data": Path(data_root).name, "thresholds": list(CANDIDATES), "dice": dice,
            "dice_at_0_5": dice[CANDIDATES.index(0.5)], "dice_at_threshold": dice[CANDIDATES.index(chosen)],
            "weights_sha256": file_sha256(segmenter.weights)}


__all__ = ["CANDIDATES", "calibrate", "choose", "dice_per_threshold", "sweep"]
