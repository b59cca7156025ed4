"""Segmentation with the reports a report writer wrote (or any other lists of reports), scored: how much a
generated report is worth against the true one. The writer itself is :mod:`lvit.inference.report_writer`.

* :func:`segment_with_reports`: a run's Dice on a split with any set of report lists (true, generated, ...);
* :func:`subset_summary`: the same figures on a subset of the images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def segment_with_reports(run: str | Path, records, reports: dict[str, Sequence[str]] | None = None, *,
                         batch_size: int = 16, device: str = "cpu", cache_dir: str | Path | None = None,
                         keep_masks: bool = False,
                         progress: Callable[[int, int], None] | None = None) -> dict:
    """A run's Dice/IoU on ``records`` with each list of reports in ``reports`` (name -> one report per record).

    A model that reads no text is scored once, under the name ``"image only"`` (``reports`` is then ignored).
    Figures are :mod:`lvit.evaluate.text_probe`'s: threshold 0.5 at the model's resolution, mean over images
    and pooled. Returns ``{"n_images", "model_name", "sources": {name: summary}, "counts": {name: [N, 3]
    tp/fp/fn}}`` plus ``"masks": {name: bool [N, S, S]}`` with ``keep_masks``.
    """
    from torch.utils.data import DataLoader

    from ..core.errors import ConfigError
    from ..core.metrics import batch_counts
    from ..data import SegmentationDataset
    from ..inference import Segmenter
    from .text_probe import THRESHOLD, _summary

    segmenter = Segmenter(run, device=device, cache_dir=cache_dir)
    n = len(records)
    if segmenter.uses_text:
        if not reports:
            raise ConfigError(f"{run}: this model reads reports: give at least one list of reports")
        for name, texts in reports.items():
            if len(texts) != n:
                raise ConfigError(f"reports {name!r}: {len(texts)} report(s) for {n} image(s)")
        encoded = {name: segmenter.text_for(list(texts), n) for name, texts in reports.items()}
    else:
        encoded = {"image only": (None, None)}
    dataset = SegmentationDataset(records, segmenter.image_size, in_channels=segmenter.in_channels)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    counts = {name: torch.zeros(n, 3, dtype=torch.float64) for name in encoded}
    side = segmenter.image_size
    masks = {name: np.zeros((n, side, side), bool) for name in encoded} if keep_masks else None
    done = 0
    for batch in loader:
        idx = batch["index"]
        target = batch["mask"] > 0.5
        for name, (emb, mask) in encoded.items():
            logits = segmenter.logits(batch["image"], None if emb is None else emb[idx],
                                      None if mask is None else mask[idx]).cpu()
            pred = torch.sigmoid(logits) >= THRESHOLD
            counts[name][idx] = batch_counts(pred, target)
            if masks is not None:
                masks[name][idx.numpy()] = pred[:, 0].numpy()
        done += len(idx)
        if progress is not None:
            progress(done, n)
    everyone = np.ones(n, bool)
    out = {"n_images": n, "model_name": segmenter.run_config.get("model_name"),
           "uses_text": segmenter.uses_text, "threshold": THRESHOLD,
           "sources": {name: _summary(c, everyone) for name, c in counts.items()},
           "counts": {name: c.numpy() for name, c in counts.items()}}
    if masks is not None:
        out["masks"] = masks
    return out


def subset_summary(counts: np.ndarray, rows: np.ndarray) -> dict:
    """Per-image mean and pooled Dice/IoU of the images ``rows`` (bool) from per-image tp/fp/fn ``[N, 3]``."""
    from .text_probe import _summary

    return _summary(torch.as_tensor(np.asarray(counts, dtype=np.float64)), np.asarray(rows, dtype=bool))


__all__ = ["segment_with_reports", "subset_summary"]
