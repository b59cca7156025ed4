"""Many images through one :class:`~lvit.inference.Segmenter`, in batches, with a progress bar: a broken image is
noted and skipped, never the end of the others.

Reading and writing files overlap the network: the next batch's images are read on a background thread while
the current batch runs (:func:`segment_images`), and the masks are saved on another (:class:`BackgroundCalls`).
torch, PIL's decoders and encoders and most numpy work release the GIL, so with torch at one thread a folder
runs at close to the network's own batched rate instead of the sum of the two.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _read_chunk(chunk: list[tuple[Path, str | None]]) -> list[tuple[Path, str | None, np.ndarray | str]]:
    """Each pair with its image, or with the one-line reason it could not be read."""
    from ..core.errors import DataError
    from ..data import read_image

    out = []
    for path, text in chunk:
        try:
            out.append((path, text, read_image(path)))
        except DataError as exc:  # a broken image: noted by the caller, the others go on
            out.append((path, text, str(exc)))
    return out


def segment_images(segmenter, pairs: list[tuple[Path, str | None]], batch_size: int, generate: bool,
                   failed: list[tuple[str, str]], progress: bool = True,
                   ) -> Iterator[tuple[Path, np.ndarray, np.ndarray, str | None]]:
    """``(image path, report or None)`` pairs -> ``(path, image HxWxC uint8, probability HxW, report read)`` per
    image that could be read, in order. ``generate``: the segmenter's report writer writes every report (the
    mask averages over its likely reports: ``Segmenter.predict_written``). An image that cannot be read is
    appended to ``failed`` as ``(name, why)``."""
    from tqdm import tqdm

    chunks = [pairs[start:start + batch_size] for start in range(0, len(pairs), batch_size)]
    with tqdm(total=len(pairs), desc="lvit predict", unit="img", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="lvit-read") as reader:
        pending = reader.submit(_read_chunk, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            read = pending.result()
            pending = reader.submit(_read_chunk, chunks[k + 1]) if k + 1 < len(chunks) else None
            chunk = []
            for path, text, image in read:
                if isinstance(image, str):
                    failed.append((path.name, image))
                    bar.update(1)
                else:
                    chunk.append((path, text, image))
            if not chunk:
                continue
            pictures = [image for _, _, image in chunk]
            texts = [text for _, text, _ in chunk] if segmenter.uses_text else None
            if generate:
                probs, texts = segmenter.predict_written(pictures)
            else:
                probs = segmenter.predict_many(pictures, texts)
            for i, ((path, _, image), prob) in enumerate(zip(chunk, probs)):
                yield path, image, prob, None if texts is None else texts[i]
                bar.update(1)


class BackgroundCalls:
    """Runs calls on one background thread, in the order given, with at most ``pending`` of them waiting; the
    first call that fails raises its exception in the caller's thread (at a later :meth:`submit` or on leaving
    the ``with`` block). Leaving the block waits for every call, so nothing is still being written afterwards;
    leaving it on an exception drops the calls not yet started. Once a call has failed, the later ones are skipped
    (as a loop calling them in turn would have stopped there)."""

    def __init__(self, pending: int = 64):
        self.pending = max(1, int(pending))
        self._futures: deque[Future] = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lvit-write")
        self._failed = False

    def _guarded(self, call: Callable, args, kwargs):
        if self._failed:
            return None
        try:
            return call(*args, **kwargs)
        except BaseException:
            self._failed = True
            raise

    def submit(self, call: Callable, *args, **kwargs) -> None:
        self._futures.append(self._pool.submit(self._guarded, call, args, kwargs))
        while self._futures and (len(self._futures) > self.pending or self._futures[0].done()):
            self._futures.popleft().result()

    def __enter__(self) -> BackgroundCalls:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            return
        try:
            while self._futures:
                self._futures.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
