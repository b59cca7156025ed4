"""Lightning's side of the run folder: the full-state checkpoint I/O and the RNG state it carries.

The run-folder format itself (file names, the run config, safetensors weights, ``load_run``) is
:mod:`lvit.artifacts.runs`, which needs no Lightning; ``RUN/checkpoints/last.ckpt`` holds only tensors, numbers,
strings and containers of them, so it loads with ``torch.load(weights_only=True)``
(:func:`lvit.artifacts.runs.load_state_file`): a checkpoint carrying pickled code is refused instead of executed.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

# The run-folder names and readers, for code written against this module before lvit.artifacts.runs existed (new code:
# import them from lvit.artifacts.runs).
from ..artifacts.runs import (  # noqa: F401
    BEST_WEIGHTS,
    CKPT_DIR,
    CONFIG_NAME,
    LAST_STATE,
    LAST_WEIGHTS,
    TEXT_EMBEDDING_PREFIX,
    load_state_file,
    load_weights,
    read_run_config,
    resolve_run,
    save_weights,
    short_reason,
    write_run_config,
)
from ..core.io import atomic_save

# --------------------------------------------------------------------------------------------------
# Full-state checkpoints (Lightning's dict, written atomically, read with weights_only=True)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes atomically and loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_save(path, lambda fh: torch.save(checkpoint, fh))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_state_file(path, map_location=map_location or "cpu")


# --------------------------------------------------------------------------------------------------
# RNG state as plain tensors (weights_only-safe)


def rng_state() -> dict[str, Any]:
    """The torch, numpy and Python RNG states as tensors and ints."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": None if py_gauss is None else float(py_gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
