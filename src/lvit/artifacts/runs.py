"""Run folders and model folders on disk: what training writes and what testing, prediction and export read.

This module needs neither Lightning nor :mod:`lvit.train`: loading a model for prediction imports torch,
safetensors and lvit's networks only. Both :mod:`lvit.train` (writing) and :mod:`lvit.evaluate` (reading) use it.

A **run folder** (``lvit train --out RUN``)::

    RUN/config.yaml                      everything needed to rebuild the model and its text encoder
    RUN/metrics.csv                      one row per epoch
    RUN/tensorboard/                     TensorBoard event files
    RUN/checkpoints/best.safetensors     weights of the epoch with the best validation Dice
    RUN/checkpoints/last.safetensors     weights after the last finished epoch
    RUN/checkpoints/last.ckpt            full training state for ``lvit train --resume`` (lvit.train)
    RUN/vocab.json, RUN/report_words.json

A **model folder** (Hugging Face layout, ``lvit export RUN --hf DIR`` or ``model.save_pretrained(DIR)``):
``config.json`` + ``model.safetensors`` + ``README.md`` (:mod:`lvit.models.pretrained`). Everything that takes a
run folder (:func:`resolve_run`, :func:`read_run_config`, :func:`load_run`) takes a model folder too, and the
name of a **shipped model** (a model folder inside the package, ``lvit/resources/models/NAME``; a local path of
the same name wins): :data:`DEFAULT_MODEL` answers when a command is given no model at all.

Weights are safetensors; ``.ckpt`` files load with ``torch.load(weights_only=True)``, so a checkpoint carrying
pickled code is refused instead of executed. Every file is written atomically (:mod:`lvit.core.io`).
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core.errors import CheckpointError, ConfigError
from ..core.io import atomic_path, atomic_write_text
from ..models.pretrained import (
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    TEXT_EMBEDDING_WEIGHTS,
    check_finite,
    load_checked_weights,
    looks_like_model_folder,
    not_local_error,
    read_model_config,
    read_safetensors,
)

CONFIG_NAME = "config.yaml"
CKPT_DIR = "checkpoints"
BEST_WEIGHTS = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
LAST_STATE = "last.ckpt"
TEXT_EMBEDDING_PREFIX = "text_embedding."  # trainable ("learned") text embedding, stored beside the model
VOCAB_NAME = "vocab.json"


# --------------------------------------------------------------------------------------------------
# Error wording shared by the loaders


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
# Files: full-state checkpoints (read only here) and safetensors weights


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


def save_weights(path: str | Path, model: torch.nn.Module, text_embedding: torch.nn.Module | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """The network's state dict (+ a learned text embedding under ``text_embedding.*``) as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if text_embedding is not None:
        for k, v in text_embedding.state_dict().items():
            tensors[TEXT_EMBEDDING_PREFIX + k] = v.detach().cpu().contiguous().clone()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or {"format": "lvit"})
    return Path(path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors weights file (one-line CheckpointError when missing or unreadable)."""
    return read_safetensors(path)


# --------------------------------------------------------------------------------------------------
# The run config


#: Held by the process training into a run folder (pid, host, start time as JSON).
LOCK_NAME = ".lvit-train.lock"


def _process_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextmanager
def run_lock(run_dir: str | Path):
    """Hold ``run_dir``'s lock while training into it. A live holder on this machine, or any holder on another
    machine (its process cannot be checked from here), is refused with one line naming it; the lock of a process
    that is gone is reported and taken over."""
    import json
    import os
    import socket
    import time

    from ..core.errors import warn

    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    host = socket.gethostname()
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        holder = None
    except (OSError, ValueError):
        holder = {"pid": None, "host": "?", "since": "?"}  # damaged: whoever wrote it is unknown
    if holder is not None:
        pid, where, since = holder.get("pid"), holder.get("host"), holder.get("since", "?")
        if where != host or not isinstance(pid, int):
            raise CheckpointError(f"{run_dir}: in use by lvit train (pid {pid} on host {where}, since {since}); lvit "
                                  f"cannot check that process from here: if it has stopped, remove {path}")
        if _process_alive(pid):
            raise CheckpointError(f"{run_dir}: in use by lvit train (pid {pid}, since {since}): wait for it to finish "
                                  "or stop it; two trainings into one run folder would overwrite each other")
        warn(f"{run_dir}: the lock of pid {pid} (since {since}) is stale, that process has ended: taking it over")
        path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    mine = {"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # another process took it between our read and now
        raise CheckpointError(f"{run_dir}: another lvit train has just started in this run folder") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(mine))
    try:
        yield path
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == mine["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass


#: The shipped model commands use when given none (a QaTa-COV19 chest X-ray LViT; its card says how it was made).
DEFAULT_MODEL = "qata-lvit"


def shipped_models_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("lvit") / "resources" / "models"))


def shipped_model_names() -> list[str]:
    """Names of the model folders shipped inside the package."""
    root = shipped_models_dir()
    return sorted(p.name for p in root.iterdir() if (p / MODEL_CONFIG).is_file()) if root.is_dir() else []


def shipped_model(name: str | Path) -> Path | None:
    """The folder of the shipped model ``name``, or None when no shipped model has that name."""
    name = str(name)
    return shipped_models_dir() / name if name in shipped_model_names() else None


def write_run_config(run_dir: str | Path, run_config: dict) -> Path:
    return atomic_write_text(Path(run_dir) / CONFIG_NAME, yaml.safe_dump(run_config, sort_keys=False))


def is_model_folder(path: str | Path) -> bool:
    """True for a model folder (``config.json``, no run ``config.yaml``); its files are checked when read."""
    return looks_like_model_folder(path)


def read_run_config(run_dir: str | Path) -> dict:
    """The run's ``config.yaml`` (or a model folder's ``config.json``) as a dict with ``model_name``, ``model``
    and, where recorded, ``text_encoder``, ``data_info`` and the training sections."""
    if is_model_folder(run_dir):
        return read_model_config(run_dir)
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: run config not found (is {run_dir} a run folder made by lvit train, or a "
                              f"model folder with {MODEL_CONFIG}?)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: unreadable run config ({first})") from None
    if not isinstance(data, dict) or "model_name" not in data or "model" not in data:
        raise CheckpointError(f"{path}: not an lvit run config (model_name/model missing)")
    return data


def resolve_run(path: str | Path) -> tuple[Path, Path]:
    """A run folder, a model folder or a weights file -> (folder, weights file). A run folder gives its best
    weights (else its last); a model folder its ``model.safetensors``."""
    path = Path(path)
    if path.is_dir():
        if is_model_folder(path):
            read_model_config(path)  # the folder's files checked here: a pickle or a stray file is refused
            return path, path / MODEL_WEIGHTS
        for candidate in (path / CKPT_DIR / BEST_WEIGHTS, path / CKPT_DIR / LAST_WEIGHTS):
            if candidate.is_file():
                return path, candidate
        if not (path / CONFIG_NAME).is_file() and (path / MODEL_WEIGHTS).is_file():
            read_model_config(path)  # model.safetensors without config.json: says what is missing
        raise CheckpointError(f"{path}: no checkpoints/{BEST_WEIGHTS} or {LAST_WEIGHTS} in this run folder")
    if not path.exists():
        shipped = shipped_model(path)
        if shipped is not None:
            return resolve_run(shipped)
        if not path.is_absolute() and len(path.parts) == 2 and not str(path).startswith("."):
            raise not_local_error(path)  # "org/name": a Hub id, never downloaded
        names = shipped_model_names()
        raise CheckpointError(f"{path}: no such run folder, model folder or checkpoint"
                              + (f" (shipped models: {', '.join(names)})" if names else ""))
    if path.name == MODEL_WEIGHTS and is_model_folder(path.parent):
        return resolve_run(path.parent)
    if path.suffix == ".safetensors":
        run_dir = path.parent.parent if path.parent.name == CKPT_DIR else path.parent
        return run_dir, path
    if path.suffix in (".ckpt", ".pt", ".pth", ".tar"):
        run_dir = path.parent.parent if path.parent.name == CKPT_DIR else path.parent
        return run_dir, path
    raise CheckpointError(f"{path}: expected a run folder, a model folder, a .safetensors weights file or a .ckpt "
                          "checkpoint")


# --------------------------------------------------------------------------------------------------
# Loading a model


@dataclass(frozen=True)
class LoadedRun:
    """A model loaded from a run folder, a model folder or a weights file.

    ``model``: the network in eval mode on the requested device; ``config``: the run config (``config.yaml`` or
    ``config.json``: ``model_name``, ``model``, ``text_encoder`` ...); ``run_dir``: the folder it came from;
    ``weights``: the weights file in use (best, else last, or ``model.safetensors``); ``text_embedding``: the
    trained embedding layer of the ``learned`` text backend (ids ``[B, L]`` -> ``[B, L, D]``), else None.
    """

    model: torch.nn.Module
    config: dict
    run_dir: Path
    weights: Path
    text_embedding: torch.nn.Module | None = None

    @property
    def model_name(self) -> str:
        return str(self.config.get("model_name"))

    @property
    def reads_text(self) -> bool:
        """Whether the network uses the report (LViT with ``use_text``; not LViT-T or U-Net)."""
        from ..models import reads_text

        return reads_text(self.model_name, self.config.get("model") or {})

    @property
    def is_model_folder(self) -> bool:
        return self.weights.name == MODEL_WEIGHTS and is_model_folder(self.run_dir)

    image_size = property(lambda self: model_image_size(self.config))
    in_channels = property(lambda self: model_in_channels(self.config))


def model_image_size(run_config: dict) -> int:
    """The input side the model of a run config was trained at."""
    return int(run_config["model"]["image_size"])


def model_in_channels(run_config: dict) -> int:
    return int(run_config["model"].get("in_channels", 3))


def _learned_embedding(text_tensors: dict[str, torch.Tensor], where: Path, map_location) -> torch.nn.Module:
    from ..text.learned import LearnedTextEmbedding

    weight = text_tensors.get("embedding.weight")
    if weight is None or weight.ndim != 2:
        raise CheckpointError(f"{where}: text embedding tensors malformed (expected embedding.weight [V, D])")
    embedding = LearnedTextEmbedding(weight.shape[0], weight.shape[1])
    try:
        embedding.load_state_dict(text_tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: text embedding does not load ({short_reason(str(exc), 200)})") from None
    return embedding.eval().to(map_location)


def load_run(path: str | Path, map_location: str | torch.device = "cpu", *,
             resolved: tuple[Path, Path, dict] | None = None) -> LoadedRun:
    """Rebuild the eval-mode model of a run folder, model folder or checkpoint file -> :class:`LoadedRun`.
    ``resolved``: (folder, weights, run config) of ``path`` already read (:func:`resolve_run`,
    :func:`read_run_config`), so that a command reads its config once."""
    from ..models import LViTConfig, build_model

    if resolved is None:
        run_dir, weights_path = resolve_run(path)
        run_config = read_run_config(run_dir)
    else:
        run_dir, weights_path, run_config = resolved
    folder = weights_path.name == MODEL_WEIGHTS and is_model_folder(run_dir)
    config_name = MODEL_CONFIG if folder else CONFIG_NAME
    try:
        model = build_model(run_config["model_name"], LViTConfig.from_dict(run_config["model"]))
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(f"{run_dir / config_name}: invalid model config ({exc})") from None
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
    if folder and (run_dir / TEXT_EMBEDDING_WEIGHTS).is_file():  # a model folder keeps it in a file of its own
        separate = load_weights(run_dir / TEXT_EMBEDDING_WEIGHTS)
        tensors.update({TEXT_EMBEDDING_PREFIX + k: v for k, v in separate.items()})
    text_tensors = {k[len(TEXT_EMBEDDING_PREFIX):]: v for k, v in tensors.items()
                    if k.startswith(TEXT_EMBEDDING_PREFIX)}
    model_tensors = {k: v for k, v in tensors.items() if not k.startswith(TEXT_EMBEDDING_PREFIX)}
    check_finite(text_tensors, weights_path)
    model = load_checked_weights(model, model_tensors, weights_path, config_name)
    text_embedding = _learned_embedding(text_tensors, weights_path, map_location) if text_tensors else None
    return LoadedRun(model.to(map_location), run_config, run_dir, weights_path, text_embedding)


__all__ = [
    "BEST_WEIGHTS", "CKPT_DIR", "CONFIG_NAME", "DEFAULT_MODEL", "LAST_STATE", "LAST_WEIGHTS", "LOCK_NAME",
    "LoadedRun", "TEXT_EMBEDDING_PREFIX", "VOCAB_NAME", "is_model_folder", "load_run", "load_state_file",
    "load_weights", "read_run_config", "resolve_run", "run_lock", "save_weights", "shipped_model",
    "shipped_model_names", "short_reason", "write_run_config",
]
