"""Which training images keep their masks in a semi-supervised run.

Either a seeded random fraction (``--labeled-fraction 0.25``) or an explicit list of names
(``--labeled-list FILE``: one name per line, or a JSON list, or a JSON object with a ``labelled`` list, such as
the ``labelled_subset.json`` a previous run wrote). The choice is written to the run folder, so the run can be
repeated or resumed with exactly the same split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...core.errors import ConfigError, DataError
from ...core.io import atomic_write_json

SUBSET_FILE = "labelled_subset.json"


@dataclass(frozen=True)
class LabelledSubset:
    labelled: tuple[str, ...]  # names in dataset order
    unlabelled: tuple[str, ...]
    source: str  # "fraction=0.25 seed=0" or the list file's path

    def mask_for(self, names: Sequence[str]) -> np.ndarray:
        """Bool ``[len(names)]``: True where the image is labelled."""
        chosen = set(self.labelled)
        return np.array([n in chosen for n in names], dtype=bool)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "n_labelled": len(self.labelled),
            "n_unlabelled": len(self.unlabelled),
            "labelled": list(self.labelled),
            "unlabelled": list(self.unlabelled),
        }


def choose_fraction(names: Sequence[str], fraction: float, seed: int = 0) -> LabelledSubset:
    """Seeded choice of ``round(fraction * N)`` names (at least 1); the same seed gives the same subset."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"--labeled-fraction must be in (0, 1], got {fraction}")
    names = list(names)
    if len(set(names)) != len(names):
        raise ConfigError("training image names are not unique; cannot choose a labelled subset by name")
    n = min(len(names), max(1, int(math.floor(fraction * len(names) + 0.5))))
    picked = set(np.random.default_rng(seed).permutation(len(names))[:n].tolist())
    return _subset(names, [names[i] for i in sorted(picked)], f"fraction={fraction} seed={seed}")


def choose_listed(names: Sequence[str], list_file: str | Path) -> LabelledSubset:
    """The names in ``list_file`` (file names or stems of the training images)."""
    path = Path(list_file)
    wanted = read_name_list(path)
    by_key: dict[str, str] = {}
    for n in names:
        by_key.setdefault(n, n)
        by_key.setdefault(Path(n).stem, n)
    unknown = [w for w in wanted if w not in by_key and Path(w).stem not in by_key]
    if unknown:
        shown = ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise DataError(path, f"{len(unknown)} listed name(s) are not training images: {shown}")
    chosen = {by_key.get(w, by_key.get(Path(w).stem)) for w in wanted}
    if not chosen:
        raise DataError(path, "the labelled list is empty")
    return _subset(list(names), [n for n in names if n in chosen], str(path))


def read_name_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(path, "labelled-image list not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(path, f"not valid JSON ({exc.msg}, line {exc.lineno})") from None
        items = obj.get("labelled") if isinstance(obj, dict) else obj
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise DataError(path, "expected a JSON list of names or an object with a 'labelled' list")
        return [x.strip() for x in items if x.strip()]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def write_subset(run_dir: str | Path, subset: LabelledSubset) -> Path:
    return atomic_write_json(Path(run_dir) / SUBSET_FILE, subset.to_json())


def _subset(names: list[str], labelled: list[str], source: str) -> LabelledSubset:
    chosen = set(labelled)
    return LabelledSubset(tuple(labelled), tuple(n for n in names if n not in chosen), source)
