"""Dataset layouts: where a dataset's images, masks and reports live, detected from the folder.

Each layout is a small adapter module with the same four functions (``detect(root)``, ``has_split(root,
split)``, ``records(root, split, **options)`` -> list of :class:`Record`, ``check(root, add, **options)``);
everything downstream (datasets, training, testing) sees only records.

* ``official`` (:mod:`.layout_official`): LViT's ``Train_Folder/img``, ``labelcol``, ``Train_text.xlsx``.
* ``annotation`` (:mod:`.layout_annotation`): ``images/{train,valid,test}/{images,masks}`` +
  ``prompts/annotation.json`` (the public cleaned copy of QaTa-COV19).

Splits are always named ``train``, ``val``, ``test``. A dataset without a validation split holds out a seeded
fraction of its training split.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np

from ..core.errors import DataError
from . import layout_annotation, layout_official
from .records import Record, index_folder

LAYOUTS: dict[str, ModuleType] = {"annotation": layout_annotation, "official": layout_official}
SPLIT_NAMES = ("train", "val", "test")


def detect_layout(root: str | Path) -> str:
    """The name of the layout of the dataset at ``root`` (``official`` when nothing matches, so that its
    messages name the folders it expected)."""
    root = Path(root)
    for name, adapter in LAYOUTS.items():
        if adapter.detect(root):
            return name
    return "official"


def load_split(
    root: str | Path,
    split: str,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    **options,
) -> list[Record]:
    """Records of ``split`` (train | val | test) of the dataset at ``root``, in the layout's order.

    ``options`` go to the layout's reader (official layout: ``image_column``, ``text_column``, ``table``;
    both: ``require_masks``). Without a validation split, "val" is a seeded ``val_fraction`` of the training
    split and "train" the rest (the two never overlap; the same seed always gives the same split).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    if split not in SPLIT_NAMES:
        raise DataError(root, f"unknown split {split!r} (use train, val or test)")
    adapter = LAYOUTS[detect_layout(root)]
    if split in ("train", "val") and not adapter.has_split(root, "val"):
        train = adapter.records(root, "train", **options)
        if not 0.0 < val_fraction < 1.0:
            raise DataError(root, f"no validation split and val_fraction={val_fraction} (needs 0 < f < 1)")
        n_val = max(1, round(len(train) * val_fraction))
        if n_val >= len(train):
            raise DataError(root, f"no validation split and only {len(train)} training sample(s) to split")
        order = np.random.default_rng(seed).permutation(len(train))
        val_idx = set(order[:n_val].tolist())
        return [r for i, r in enumerate(train) if (i in val_idx) == (split == "val")]
    return adapter.records(root, split, **options)


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder (for prediction on images without reports/masks)."""
    return list(index_folder(Path(folder)).values())


__all__ = ["LAYOUTS", "SPLIT_NAMES", "Record", "detect_layout", "list_images", "load_split"]
