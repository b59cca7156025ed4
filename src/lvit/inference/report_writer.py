"""The report writer at inference time: a stored writer (``lvit train-reporter``) that writes LViT-template
reports from images alone.

A writer (stored as :mod:`lvit.artifacts.reporter_folder` says) scores the six zones of LViT's template from the
image; per-zone thresholds chosen on the validation split turn the scores into flags (:mod:`lvit.data.flags`), and
:class:`lvit.data.describe.Findings` turns the flags into the report (count = zones named, sides = lungs named:
QaTa-COV19's convention). A writer trained on data without normal cases never writes "no pulmonary infection.":
when no zone passes its threshold it names the most likely one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.describe import ZONES, Findings, format_report
from ..data.flags import findings_from_probabilities, likely_flag_sets, possible_reports


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
        return self.reports_from(self.probabilities(images))

    def reports_from(self, probs: np.ndarray) -> list[str]:
        """The reports of zone scores ``probs [N, 6]`` (:meth:`probabilities`)."""
        return [format_report(f, capitalize=self.capitalize) for f in self.decode(probs)]

    def report(self, image: np.ndarray) -> str:
        return self.reports([image])[0]

    def likely_reports(self, probs: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """The ``k`` most probable reports per image for zone scores ``probs [N, 6]`` (zones read as independent),
        and their weights ``[N, k]`` (summing to 1 per image): what :meth:`Segmenter.logits_over_reports
        <lvit.inference.Segmenter.logits_over_reports>` averages over. Only reports this writer can write."""
        sets, weights = likely_flag_sets(probs, k, self.allow_empty)
        reports = [[format_report(Findings.from_flags(f), capitalize=self.capitalize) for f in row] for row in sets]
        return reports, weights

    def possible_reports(self) -> list[str]:
        """Every report this writer can write (:func:`lvit.data.flags.possible_reports` with its settings)."""
        return possible_reports(self.allow_empty, self.capitalize)


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
    return writer.reports_from(probs), probs
