"""Many images through one :class:`~lvit.inference.Segmenter`, in batches, with a progress bar: a broken image is
noted and skipped, never the end of the others."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


def segment_images(segmenter, pairs: list[tuple[Path, str | None]], batch_size: int, generate: bool,
                   failed: list[tuple[str, str]], progress: bool = True,
                   ) -> Iterator[tuple[Path, np.ndarray, np.ndarray, str | None]]:
    """``(image path, report or None)`` pairs -> ``(path, image HxWxC uint8, probability HxW, report read)`` per
    image that could be read, in order. ``generate``: the segmenter's report writer writes every report. An image
    that cannot be read is appended to ``failed`` as ``(name, why)``."""
    from tqdm import tqdm

    from ..core.errors import DataError
    from ..data import read_image

    with tqdm(total=len(pairs), desc="lvit predict", unit="img", disable=not progress) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = []
            for path, text in pairs[start:start + batch_size]:
                try:
                    chunk.append((path, text, read_image(path)))
                except DataError as exc:  # a broken image: note it, go on with the others
                    failed.append((path.name, str(exc)))
                    bar.update(1)
            if not chunk:
                continue
            pictures = [image for _, _, image in chunk]
            texts = [text for _, text, _ in chunk] if segmenter.uses_text else None
            if generate:
                texts = segmenter.report_writer.reports(pictures)
            probs = segmenter.predict_many(pictures, texts)
            for i, ((path, _, image), prob) in enumerate(zip(chunk, probs)):
                yield path, image, prob, None if texts is None else texts[i]
                bar.update(1)
