"""The report writer's folder: ``reporter.json`` (model config, thresholds, how it was trained, validation
scores) and ``weights.safetensors``; stored by :mod:`lvit.train.reporter`, used by :mod:`lvit.evaluate.reporter`.
A run folder carries its writer in ``RUN/reporter/``. Loading needs no training code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError, ConfigError

FORMAT = "lvit-reporter"
FORMAT_VERSION = 1
META_FILE = "reporter.json"
WEIGHTS_FILE = "weights.safetensors"
RUN_SUBDIR = "reporter"  # where a run folder keeps its writer


def save_reporter(folder: str | Path, model, meta: dict) -> Path:
    """Write ``weights.safetensors`` and ``reporter.json`` into ``folder`` (atomic; the JSON last, so a folder
    with a ``reporter.json`` always has its weights)."""
    from safetensors.torch import save_file

    from ..core.io import atomic_path, atomic_write_json

    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    atomic_write_json(folder / META_FILE, {k: v for k, v in meta.items() if k != "folder"})
    return folder


def find_reporter(path: str | Path) -> Path | None:
    """The writer folder ``path`` names: ``path`` itself when it holds ``reporter.json``, ``path/reporter`` when
    that does (a run folder carrying its writer), else None."""
    path = Path(path)
    if path.is_file() and path.name == META_FILE:
        path = path.parent
    for candidate in (path, path / RUN_SUBDIR):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def read_reporter_meta(path: str | Path) -> dict:
    """The checked ``reporter.json`` of a writer folder (or of the run folder that carries it), with ``folder``.
    Missing or damaged files are one-line CheckpointErrors."""
    folder = find_reporter(path)
    if folder is None:
        raise CheckpointError(f"{path}: no report writer here ({META_FILE}, or {RUN_SUBDIR}/{META_FILE} in a run "
                              "folder); train one with `lvit train-reporter`")
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable report writer config ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a report writer config (format {FORMAT!r} missing)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: report writer format version {meta.get('format_version')!r}; this lvit "
                              f"reads version {FORMAT_VERSION}")
    thresholds = meta.get("thresholds")
    if (not isinstance(thresholds, list) or len(thresholds) != 6
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 <= t <= 1.0
                       for t in thresholds)):
        raise CheckpointError(f"{meta_path}: thresholds must be six numbers in [0, 1], got {thresholds!r}")
    if not isinstance(meta.get("allow_empty"), bool):
        raise CheckpointError(f"{meta_path}: allow_empty must be true or false")
    return {**meta, "folder": str(folder)}


def load_reporter(path: str | Path, map_location: Any = "cpu"):
    """(eval-mode :class:`ZoneClassifier`, checked meta dict) of a writer folder or a run folder carrying one."""
    from ..models.reporter import ReporterConfig, ZoneClassifier
    from .runs import load_weights

    meta = read_reporter_meta(path)
    folder = Path(meta["folder"])
    try:
        config = ReporterConfig.from_dict(meta.get("model") or {})
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(f"{folder / META_FILE}: invalid report writer model config ({exc})") from None
    if config.n_flags != 6:
        raise CheckpointError(f"{folder / META_FILE}: a report writer scores 6 zones, this one {config.n_flags}")
    model = ZoneClassifier(config)
    tensors = load_weights(folder / WEIGHTS_FILE)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: weights do not fit the report writer config "
                              f"({'; '.join(parts)})")
    model.load_state_dict(tensors)
    model.to(map_location)
    model.eval()
    return model, meta


__all__ = ["FORMAT", "FORMAT_VERSION", "META_FILE", "RUN_SUBDIR", "WEIGHTS_FILE", "find_reporter", "load_reporter",
           "read_reporter_meta", "save_reporter"]
