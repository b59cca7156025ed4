"""Reports without a radiologist: the report writer at inference time, its scores, and segmentation with the
reports it writes.

A report writer (trained by ``lvit train-reporter``, stored as :mod:`lvit.artifacts.reporter_folder` says)
scores the six
zones of LViT's template from the image alone; per-zone thresholds chosen on the validation split turn the scores
into flags (:mod:`lvit.data.flags`), and :class:`lvit.data.describe.Findings` turns the flags into the report
(count = zones named, sides = lungs named: QaTa-COV19's convention). A writer trained on data without normal cases
never writes "no pulmonary infection.": when no zone passes its threshold it names the most likely one.

* :class:`ReportWriter`: a stored writer loaded for inference (``reports(images)``);
* :func:`write_reports`: the writer's reports for the images of a list of records;
* :func:`segment_with_reports`: a run's Dice on a split with any set of report lists (true, generated, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.describe import ZONES, Findings, format_report
from ..data.flags import findings_from_probabilities

# --- the writer at inference time -----------------------------------------------------------------------------


class ReportWriter:
    """A stored report writer, ready to write reports from images.

    ``ReportWriter(path)`` with ``path`` a writer folder (``reporter.json`` + ``weights.safetensors``) or a run
    folder holding one in ``reporter/``. ``reports(images)`` -> one report per image (``H x W [x C]`` uint8, any
    size); ``probabilities(images)`` -> zone scores ``[N, 6]``; ``findings(images)`` -> :class:`Findings`.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from ..artifacts.reporter_folder import load_reporter

        self.device = torch.device(device)
        self.model, self.meta = load_reporter(path, map_location=self.device)
        self.folder = Path(self.meta["folder"])
        self.image_size = int(self.model.config.image_size)
        self.in_channels = int(self.model.config.in_channels)
        self.thresholds = np.asarray(self.meta["thresholds"], dtype=np.float64)
        self.allow_empty = bool(self.meta["allow_empty"])
        self.capitalize = bool(self.meta.get("capitalize", False))

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``H x W [x C]`` uint8 -> ``[in_channels, S, S]`` float in [0, 1] (lvit's one image preprocessing)."""
        from ..data import prepare_image

        return prepare_image(image, self.image_size, self.in_channels)

    @torch.no_grad()
    def probabilities_of(self, batch: torch.Tensor) -> np.ndarray:
        """Preprocessed images ``[B, C, S, S]`` -> zone scores ``[B, 6]`` float64 in [0, 1]."""
        return torch.sigmoid(self.model(batch.to(self.device)).float()).cpu().double().numpy()

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not len(images):
            return np.zeros((0, len(ZONES)))
        return self.probabilities_of(torch.stack([self.preprocess(im) for im in images]))

    def decode(self, probs: np.ndarray) -> list[Findings]:
        return findings_from_probabilities(probs, self.thresholds, self.allow_empty)

    def findings(self, images: Sequence[np.ndarray]) -> list[Findings]:
        return self.decode(self.probabilities(images))

    def reports(self, images: Sequence[np.ndarray]) -> list[str]:
        """One report per image, in the style of the writer's training reports (capitalised or not)."""
        return [format_report(f, capitalize=self.capitalize) for f in self.findings(images)]

    def report(self, image: np.ndarray) -> str:
        return self.reports([image])[0]


def write_reports(writer: ReportWriter, records, batch_size: int = 32,
                  progress: Callable[[int, int], None] | None = None) -> tuple[list[str], np.ndarray]:
    """Reports and zone scores ``[N, 6]`` the writer gives the images of ``records`` (anything with
    ``image_path``), in order. ``progress(done, total)`` after each batch."""
    from ..data import read_image

    probs = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        probs.append(writer.probabilities([read_image(r.image_path) for r in chunk]))
        if progress is not None:
            progress(min(start + batch_size, len(records)), len(records))
    probs = np.concatenate(probs) if probs else np.zeros((0, len(ZONES)))
    return [format_report(f, capitalize=writer.capitalize) for f in writer.decode(probs)], probs


# --- segmentation with given reports --------------------------------------------------------------------------


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
    from .predict import Predictor
    from .text_probe import THRESHOLD, _summary

    predictor = Predictor(run, device=device, cache_dir=cache_dir)
    n = len(records)
    if predictor.uses_text:
        if not reports:
            raise ConfigError(f"{run}: this model reads reports: give at least one list of reports")
        for name, texts in reports.items():
            if len(texts) != n:
                raise ConfigError(f"reports {name!r}: {len(texts)} report(s) for {n} image(s)")
        encoded = {name: predictor.text_for(list(texts), n) for name, texts in reports.items()}
    else:
        encoded = {"image only": (None, None)}
    dataset = SegmentationDataset(records, predictor.image_size, in_channels=predictor.in_channels)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    counts = {name: torch.zeros(n, 3, dtype=torch.float64) for name in encoded}
    side = predictor.image_size
    masks = {name: np.zeros((n, side, side), bool) for name in encoded} if keep_masks else None
    done = 0
    for batch in loader:
        idx = batch["index"]
        target = batch["mask"] > 0.5
        for name, (emb, mask) in encoded.items():
            logits = predictor.logits(batch["image"], None if emb is None else emb[idx],
                                      None if mask is None else mask[idx]).cpu()
            pred = torch.sigmoid(logits) >= THRESHOLD
            counts[name][idx] = batch_counts(pred, target)
            if masks is not None:
                masks[name][idx.numpy()] = pred[:, 0].numpy()
        done += len(idx)
        if progress is not None:
            progress(done, n)
    everyone = np.ones(n, bool)
    out = {"n_images": n, "model_name": predictor.run_config.get("model_name"),
           "uses_text": predictor.uses_text, "threshold": THRESHOLD,
           "sources": {name: _summary(c, everyone) for name, c in counts.items()},
           "counts": {name: c.numpy() for name, c in counts.items()}}
    if masks is not None:
        out["masks"] = masks
    return out


def subset_summary(counts: np.ndarray, rows: np.ndarray) -> dict:
    """Per-image mean and pooled Dice/IoU of the images ``rows`` (bool) from per-image tp/fp/fn ``[N, 3]``."""
    from .text_probe import _summary

    return _summary(torch.as_tensor(np.asarray(counts, dtype=np.float64)), np.asarray(rows, dtype=bool))


__all__ = ["ReportWriter", "segment_with_reports", "subset_summary", "write_reports"]
