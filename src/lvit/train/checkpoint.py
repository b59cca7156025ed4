"""Run folders and checkpoints: safetensors weights, a YAML run config, and a safe full-state checkpoint.

Layout of a run folder::

    RUN_DIR/config.yaml                      everything needed to rebuild the model and its text encoder
    RUN_DIR/metrics.csv                      one row per epoch
    RUN_DIR/tensorboard/                     TensorBoard event files
    RUN_DIR/checkpoints/best.safetensors     weights of the epoch with the best validation Dice
    RUN_DIR/checkpoints/last.safetensors     weights after the last finished epoch
    RUN_DIR/checkpoints/last.ckpt            full training state for ``lvit train --resume``

Every file is written atomically (temporary file + fsync + rename: :mod:`lvit.io`). ``last.ckpt`` holds only
tensors, numbers, strings and containers of them, so it loads with ``torch.load(weights_only=True)``: a
checkpoint carrying pickled code is refused instead of executed.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..errors import CheckpointError, ConfigError
from ..io import atomic_path, atomic_save, atomic_write_text

CONFIG_NAME = "config.yaml"
CKPT_DIR = "checkpoints"
BEST_WEIGHTS = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
LAST_STATE = "last.ckpt"
TEXT_EMBEDDING_PREFIX = "text_embedding."  # trainable ("learned") text embedding, stored beside the model


# --------------------------------------------------------------------------------------------------
# Full-state checkpoints (Lightning's dict, written atomically, read with weights_only=True)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes atomically and loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_save(path, lambda fh: torch.save(checkpoint, fh))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load_state_file(path, map_location=map_location or "cpu")


def load_state_file(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors for missing, corrupt or unsafe files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load: the checkpoint contains objects other than tensors "
                              f"and plain data ({_unpickling_problem(str(exc))})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({_load_problem(path, exc)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (top level is {type(state).__name__})")
    return state


def short_reason(text: str, limit: int = 160) -> str:
    """A library's error text as a short clause: its first sentence, cut at a word boundary (with "...")."""
    text = " ".join(str(text).split())
    head, dot, _ = text.partition(". ")
    text = head if dot else text.rstrip(".")
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + "..."
    return text


def _unpickling_problem(text: str) -> str:
    """The specific part of torch's weights_only refusal (its first paragraph is generic advice)."""
    import re

    found = re.search(r"(unsupported GLOBAL \S+)|WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, flags=re.S)
    if found:
        return short_reason(found.group(1) or found.group(2))
    return short_reason(text) if text.strip() else "unsafe content"


def _load_problem(path: Path, exc: BaseException) -> str:
    """Why torch.load failed, in words: a cut-off archive is named as such (not torch's miniz paragraph)."""
    text = " ".join(str(exc).split())
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        size, head = -1, b""
    if size == 0:
        return "empty file (0 bytes)"
    archive = "zip archive" in text or "central directory" in text
    if head.startswith(b"PK") and (archive or isinstance(exc, (OSError, EOFError))):
        return (f"truncated or damaged: the checkpoint archive is incomplete ({size:,} bytes); it was probably cut "
                "off while being written or copied")
    if archive:
        return "not a checkpoint archive (damaged, or another kind of file)"
    return short_reason(text or type(exc).__name__)


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


# --------------------------------------------------------------------------------------------------
# Weights (safetensors)


def save_weights(path: str | Path, model: torch.nn.Module, text_embedding: torch.nn.Module | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if text_embedding is not None:
        for k, v in text_embedding.state_dict().items():
            tensors[TEXT_EMBEDDING_PREFIX + k] = v.detach().cpu().contiguous().clone()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or {"format": "lvit"})
    return Path(path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({short_reason(str(exc) or type(exc).__name__)})") from None


# --------------------------------------------------------------------------------------------------
# Run config and load_run


def write_run_config(run_dir: str | Path, run_config: dict) -> Path:
    return atomic_write_text(Path(run_dir) / CONFIG_NAME, yaml.safe_dump(run_config, sort_keys=False))


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: run config not found (is {run_dir} a run folder made by lvit train?)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: unreadable run config ({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
    if not isinstance(data, dict) or "model_name" not in data or "model" not in data:
        raise CheckpointError(f"{path}: not an lvit run config (model_name/model missing)")
    return data


def resolve_run(path: str | Path) -> tuple[Path, Path]:
    """A run folder or a weights file -> (run folder, weights file). A folder gives its best weights."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / CKPT_DIR / BEST_WEIGHTS, path / CKPT_DIR / LAST_WEIGHTS):
            if candidate.is_file():
                return path, candidate
        raise CheckpointError(f"{path}: no checkpoints/{BEST_WEIGHTS} or {LAST_WEIGHTS} in this run folder")
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder or checkpoint")
    if path.suffix == ".safetensors":
        run_dir = path.parent.parent if path.parent.name == CKPT_DIR else path.parent
        return run_dir, path
    if path.suffix in (".ckpt", ".pt", ".pth", ".tar"):
        run_dir = path.parent.parent if path.parent.name == CKPT_DIR else path.parent
        return run_dir, path
    raise CheckpointError(f"{path}: expected a run folder, a .safetensors weights file or a .ckpt checkpoint")


def load_run(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild an eval-mode model from a run folder or checkpoint file.

    Returns ``(model, run_config)``; ``run_config`` is the parsed ``config.yaml`` (keys ``model_name``,
    ``model``, ``text_encoder`` ...). For the learned text backend the trained embedding layer is attached
    as ``model.lvit_text_embedding`` (ids ``[B, L]`` -> ``[B, L, D]``).
    """
    from ..models import LViTConfig, build_model

    run_dir, weights_path = resolve_run(path)
    run_config = read_run_config(run_dir)
    try:
        model_config = LViTConfig(**run_config["model"])
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(f"{run_dir / CONFIG_NAME}: invalid model config ({exc})") from None
    model = build_model(run_config["model_name"], model_config)
    if weights_path.suffix == ".safetensors":
        tensors = load_weights(weights_path)
    else:
        state = load_state_file(weights_path, map_location="cpu")
        if "state_dict" not in state:
            raise CheckpointError(f"{weights_path}: no state_dict in this checkpoint")
        tensors = {}
        for key, value in state["state_dict"].items():
            if key.startswith("model."):
                tensors[key[len("model."):]] = value
            elif key.startswith(TEXT_EMBEDDING_PREFIX):
                tensors[key] = value
    text_tensors = {k[len(TEXT_EMBEDDING_PREFIX):]: v for k, v in tensors.items() if k.startswith(TEXT_EMBEDDING_PREFIX)}
    model_tensors = {k: v for k, v in tensors.items() if not k.startswith(TEXT_EMBEDDING_PREFIX)}
    try:
        model.load_state_dict(model_tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_path}: weights do not fit the model in {CONFIG_NAME} "
                              f"({short_reason(str(exc) or type(exc).__name__, 200)})") from None
    text_embedding = None
    if text_tensors:
        from ..text.learned import LearnedTextEmbedding

        weight = text_tensors["embedding.weight"]
        embedding = LearnedTextEmbedding(weight.shape[0], weight.shape[1])
        embedding.load_state_dict(text_tensors)
        text_embedding = embedding.eval().to(map_location)
    # Plain attributes (not submodules): the model's own state_dict stays that of the network.
    object.__setattr__(model, "lvit_text_embedding", text_embedding)
    object.__setattr__(model, "lvit_run_dir", run_dir)
    object.__setattr__(model, "lvit_weights", weights_path)
    return model.eval().to(map_location), run_config
