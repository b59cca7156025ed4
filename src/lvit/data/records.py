"""What every dataset layout yields (:class:`Record`) and reports (:class:`Problem`), and the file-level
checks the layouts share: names that must stay inside the dataset, folder indexes, garbled text."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import DataError
from .readers import is_binary_mask, is_image_file, read_array, stem_of

# UTF-8 bytes decoded as Latin-1/cp1252 ("Ã©" for "é"): the usual sign of a wrongly decoded spreadsheet.
_MOJIBAKE = re.compile("[\u00c2\u00c3][\u0080-\u00bf]")


@dataclass(frozen=True)
class Record:
    """One sample: ``name`` is the image file name; ``mask_path`` is None where no mask exists."""

    name: str
    image_path: Path
    mask_path: Path | None
    text: str


@dataclass(frozen=True)
class Problem:
    """One finding of ``lvit check-data``. ``note`` findings are reported but do not fail the check (images
    that no entry of an annotation file mentions, for example)."""

    path: str  # relative to the dataset root where possible
    problem: str
    note: bool = False


def garbled(text: str) -> bool:
    """Mojibake / control characters: U+FFFD, C0/C1 controls other than whitespace, or 'Ã' sequences."""
    if "\ufffd" in text or _MOJIBAKE.search(text):
        return True
    return any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in text)


def safe_child(base: Path, name: str, what: Path) -> Path:
    """``base / name`` when it stays inside ``base``; DataError otherwise (path traversal, absolute)."""
    candidate = Path(name)
    if candidate.is_absolute() or any(part == ".." for part in candidate.parts) or "\\" in name:
        raise DataError(what, f"file name {name!r} points outside the dataset folder; refused")
    resolved = (base / candidate).resolve()
    if not resolved.is_relative_to(base.resolve()):
        raise DataError(what, f"file name {name!r} points outside the dataset folder; refused")
    return base / candidate


def index_folder(folder: Path) -> dict[str, Path]:
    """Image files of a folder by name."""
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and is_image_file(p)}


def stem_index(images: dict[str, Path]) -> dict[str, list[str]]:
    """Image names by stem (``a.tif`` -> ``a``), built once per folder."""
    by_stem: dict[str, list[str]] = {}
    for name in images:
        by_stem.setdefault(stem_of(name), []).append(name)
    return by_stem


def check_pixels(images: dict[str, Path], pairs: list[tuple[str | None, Path | None]], add, *,
                 progress: bool = False, desc: str = "") -> None:
    """Read every image of ``images`` and every mask of ``pairs`` (image name, mask path) exactly once and pass
    each problem to ``add(path, problem)``: unreadable files, mask size unlike its image's, non-binary masks."""
    from tqdm import tqdm

    sizes: dict[str, tuple[int, int]] = {}
    for name in tqdm(images, desc=f"check {desc} images", disable=not progress, unit="img"):
        try:
            sizes[name] = read_array(images[name]).shape[:2]
        except DataError as exc:
            add(images[name], exc.problem)
    for image, mask in tqdm(pairs, desc=f"check {desc} masks", disable=not progress, unit="mask"):
        if mask is None:
            continue
        try:
            arr = read_array(mask)
        except DataError as exc:
            add(mask, exc.problem)
            continue
        if image in sizes and arr.shape[:2] != sizes[image]:
            (h, w), (ih, iw) = arr.shape[:2], sizes[image]
            add(mask, f"mask size {w}x{h} differs from image size {iw}x{ih}")
        if not is_binary_mask(arr):
            add(mask, "non-binary mask values (expected 0/255 or 0/1)")
