"""The frozen network a run distils from (``loss.distill_teacher``): loaded once, checked to read what the run reads.

The distillation term (:func:`lvit.train.losses.distillation_loss`) pulls the no-report answer of the rows whose
report was dropped towards an answer with the report. By default that answer is the network's own; a teacher named
here gives a fully trained reader's answer from the first step instead. It must see the same inputs as the student:
the same image size and channels, and the same report encoding (encoder, tokens, vector size), since the student's
encoded reports are handed to it as they are. ``distill_teacher.json`` in the run folder records which weights were
used (path and sha256); a resumed run must find the same weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

from ..core.errors import ConfigError
from ..core.io import atomic_write_json

REPORT_NAME = "distill_teacher.json"
#: Settings of the teacher's network that must equal the student's (the inputs it is handed).
SHARED_MODEL_SETTINGS = ("image_size", "in_channels", "text_tokens", "text_dim")
#: Settings of the report encoding that must equal the student's.
SHARED_TEXT_SETTINGS = ("spec", "max_tokens", "min_words", "dim")


def load_distill_teacher(source: str, model_config, text_info: dict | None,
                         learns_text: bool) -> tuple[nn.Module, dict]:
    """(the eval-mode float32 network of ``source``, a record of it: source, weights file, sha256). ``source``: a
    run folder, model folder or shipped model name. ``model_config``: the student's
    :class:`~lvit.models.LViTConfig`; ``text_info``: its encoder's description (``encoder.describe()``);
    ``learns_text``: the student trains its own text embedding. A one-line ConfigError naming
    ``loss.distill_teacher`` when the teacher cannot be read or does not read the student's inputs."""
    from ..artifacts.runs import load_run
    from ..core.errors import CheckpointError

    where = f"loss.distill_teacher {source}"
    if learns_text:
        raise ConfigError(f"{where}: this run learns its own text embedding, which a teacher cannot read; use a "
                          "fixed text encoder (for example text.encoder=minilm)")
    try:
        run = load_run(source)
    except CheckpointError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not run.reads_text:
        raise ConfigError(f"{where}: a {run.model_name} network reads no report, so it has no answer with one")
    theirs = run.config.get("model") or {}
    for key in SHARED_MODEL_SETTINGS:
        if theirs.get(key) != getattr(model_config, key):
            raise ConfigError(f"{where}: its model.{key} is {theirs.get(key)!r}, this run's "
                              f"{getattr(model_config, key)!r}")
    their_text = run.config.get("text_encoder") or {}
    for key in SHARED_TEXT_SETTINGS:
        if their_text.get(key) != (text_info or {}).get(key):
            raise ConfigError(f"{where}: its text encoder's {key} is {their_text.get(key)!r}, this run's "
                              f"{(text_info or {}).get(key)!r}")
    weights = Path(run.weights).resolve()
    record = {"source": source, "weights": str(weights),
              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    return run.model.float().eval(), record


def check_same_teacher(run_dir: str | Path, record: dict) -> None:
    """On resume: a one-line ConfigError unless the teacher's weights are those the run distilled from so far."""
    path = Path(run_dir) / REPORT_NAME
    if not path.is_file():
        return  # started before the record existed: nothing to compare with
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc.__class__.__name__}); it records the teacher's weights") from None
    if before.get("sha256") != record["sha256"]:
        raise ConfigError(f"loss.distill_teacher {record['source']}: its weights {record['weights']} (sha256 "
                          f"{record['sha256'][:12]}) are not the ones this run distilled from so far "
                          f"({before.get('weights')}, sha256 {str(before.get('sha256'))[:12]}); resume with those")


def write_teacher_record(run_dir: str | Path, record: dict) -> Path:
    return atomic_write_json(Path(run_dir) / REPORT_NAME, record)


__all__ = ["REPORT_NAME", "SHARED_MODEL_SETTINGS", "SHARED_TEXT_SETTINGS", "check_same_teacher",
           "load_distill_teacher", "write_teacher_record"]
