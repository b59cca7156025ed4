"""A model's own mask threshold, chosen on the validation split (``lvit calibrate``), and where it is kept.

A network's probabilities are thresholded at 0.5 unless its run or model folder carries a threshold chosen on
validation data (:mod:`lvit.evaluate.threshold` picks it). It is kept

* in a run folder as ``RUN/threshold.json``, with the sha256 of the weights it was chosen for: weights trained
  further (a resumed run's new best epoch) no longer match, and the file is then ignored with a warning;
* in a model folder as the ``threshold`` entry of ``config.json`` (``lvit export`` copies a run's threshold whose
  weights are the ones exported; the folder's config and weights travel together).

Both hold one record: ``{"threshold": t, "split": "val", "n_images": n, "reports": "true", "thresholds": [...],
"dice": [...], "weights_sha256": ...}`` (``dice``: per-image Dice at the masks' original size at each candidate).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..core.errors import CheckpointError, warn
from ..core.io import atomic_write_text

THRESHOLD_FILE = "threshold.json"
DEFAULT_THRESHOLD = 0.5  # the official test code's, and every model's without a chosen one
CONFIG_KEY = "threshold"  # in a model folder's config.json


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_record(record, where: str | Path) -> dict:
    """``record`` when it is a threshold record (a number in (0, 1) under ``threshold``), else a one-line
    :class:`CheckpointError` naming ``where``."""
    value = record.get("threshold") if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise CheckpointError(f"{where}: not a threshold record (\"threshold\" must be a number in (0, 1), got "
                              f"{value!r})")
    return record


def read_threshold(run_dir: str | Path, run_config: dict, weights: str | Path, is_model_folder: bool) -> dict | None:
    """The threshold record that applies to these weights, or None (then 0.5 applies)."""
    if is_model_folder:
        record = run_config.get(CONFIG_KEY)
        return None if record is None else check_record(record, Path(run_dir) / "config.json")
    path = Path(run_dir) / THRESHOLD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable threshold file ({exc})") from None
    check_record(record, path)
    if record.get("weights_sha256") != file_sha256(weights):
        warn(f"{path}: chosen for other weights than {weights} (trained further since?): thresholding at "
             f"{DEFAULT_THRESHOLD}; run lvit calibrate again")
        return None
    return record


def write_threshold(run_dir: str | Path, record: dict) -> Path:
    """``RUN/threshold.json`` (atomically)."""
    check_record(record, Path(run_dir) / THRESHOLD_FILE)
    return atomic_write_text(Path(run_dir) / THRESHOLD_FILE, json.dumps(record, indent=1, sort_keys=True) + "\n")


def describe_threshold(record: dict | None) -> str:
    """One phrase for a command's output: where the threshold in use comes from."""
    if record is None:
        return f"threshold {DEFAULT_THRESHOLD:g} (the default: no threshold chosen for these weights)"
    return (f"threshold {float(record['threshold']):g} (the model's, chosen on {record.get('split', '?')}: "
            f"{record.get('n_images', '?')} images)")


__all__ = ["CONFIG_KEY", "DEFAULT_THRESHOLD", "THRESHOLD_FILE", "check_record", "describe_threshold",
           "file_sha256", "read_threshold", "write_threshold"]
