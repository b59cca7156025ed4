"""Training: configs, the official loss, the Lightning module, run folders and checkpoints.

Heavy submodules (Lightning) are imported on first use, so ``from lvit.train import load_config`` stays light.
"""

from __future__ import annotations

import importlib

from .config import TrainConfig, load_config

_LAZY = {
    "DiceBCELoss": ".losses",
    "SegmentationModule": ".module",
    "train": ".runner",
    "resume_config": ".runner",
    "TrainResult": ".runner",
    "load_run": "..runs",  # the run-folder format lives in lvit.artifacts.runs (no Lightning)
    "resolve_run": "..runs",
    "read_run_config": "..runs",
}

__all__ = ["TrainConfig", "load_config", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
