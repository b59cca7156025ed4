"""Several semi-supervised variants from one shared warm-up: keep a run's state after epoch N, start others there.

Why: during the warm-up a semi-supervised run trains on labelled batches only, drawn by an order that depends on
the seed and the epoch alone (:class:`~lvit.train.semi.sampler.WarmupSampler`), so two runs that differ only in
what happens after the warm-up (EPI or EPI + LV, the momentum, the LV weight, a longer warm-up) are the same run
for their first N epochs, bit for bit. Training those epochs once and branching the variants from the saved
state gives exactly the runs trained from scratch (the branch resumes a full-state checkpoint, which is exact),
for the cost of the epochs after the branch point.

    train(config, data, run_dir, plugins=[Callbacks(KeepStateAfter(run_dir, 5))])   # the shared warm-up
    branch_run(run_dir, 5, other_dir, SemiConfig(mode="epi+lv", warmup_epochs=5, ...))
    train(other_config, data, other_dir, resume=True)

A branched run folder records where it started in ``branched_from.json``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import lightning.pytorch as pl

from ...errors import CheckpointError, ConfigError
from ...io import atomic_path, atomic_write_json
from ...runs import (
    BEST_WEIGHTS,
    CKPT_DIR,
    LAST_STATE,
    LAST_WEIGHTS,
    load_state_file,
    read_run_config,
    write_run_config,
)
from ..config import SemiConfig
from .labelled_subset import SUBSET_FILE
from .module import CHECKPOINT_KEY

BRANCH_FILE = "branched_from.json"
STATE_FILES = (LAST_STATE, LAST_WEIGHTS, BEST_WEIGHTS)
# Settings that act only once pseudo labels start: runs differing in these share their warm-up epochs.
AFTER_WARMUP = ("mode", "warmup_epochs", "beta", "lv_weight", "pseudo_threshold", "lv_contrast", "lv_encoder",
                "lv_max_tokens", "storage")
# Files of a run folder that the branch copies (the others are written by the resumed run).
COPIED = (SUBSET_FILE, "report_words.json", "vocab.json")


def kept_state_dir(run_dir: str | Path, epoch: int) -> Path:
    """Where :class:`KeepStateAfter` keeps a run's state after ``epoch`` (1-based) epochs."""
    return Path(run_dir) / CKPT_DIR / f"after-epoch-{int(epoch)}"


class KeepStateAfter(pl.Callback):
    """Copy the run's full state (``last.ckpt`` and the last/best weights) once ``epochs`` epochs have finished,
    into ``checkpoints/after-epoch-N/`` (before the next epoch overwrites them).

    Copied when the next epoch starts: the run-folder callback writes ``last.ckpt`` as the last act of an
    epoch, after every other callback's epoch-end hook. A run resumed past that epoch keeps nothing."""

    def __init__(self, run_dir: str | Path, *epochs: int):
        self.run_dir = Path(run_dir)
        self.epochs = {int(e) for e in epochs}
        if not self.epochs or min(self.epochs) < 1:
            raise ConfigError(f"keep the state after at least one epoch (>= 1), got {sorted(self.epochs)}")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch  # epochs finished
        if epoch not in self.epochs or not trainer.is_global_zero:
            return
        source = self.run_dir / CKPT_DIR
        dest = kept_state_dir(self.run_dir, epoch)
        for name in STATE_FILES:
            if (source / name).is_file():
                with atomic_path(dest / name) as tmp:
                    shutil.copyfile(source / name, tmp)
        if (self.run_dir / "metrics.csv").is_file():
            with atomic_path(dest / "metrics.csv") as tmp:
                shutil.copyfile(self.run_dir / "metrics.csv", tmp)


def branch_run(source_run: str | Path, epoch: int, target_run: str | Path, semi: SemiConfig) -> Path:
    """Make ``target_run`` a copy of ``source_run`` after ``epoch`` epochs, with the semi settings ``semi``;
    continue it with ``train(..., resume=True)``.

    Refused in one line unless the kept state exists and is that epoch's, both runs are still in their warm-up
    at that epoch (pseudo labels on in both modes, ``warmup_epochs >= epoch``), and ``semi`` draws the same
    labelled subset (fraction or list, and seed). ``target_run`` must not exist yet.
    """
    source_run, target_run = Path(source_run), Path(target_run)
    epoch = int(epoch)
    kept = kept_state_dir(source_run, epoch)
    if not (kept / LAST_STATE).is_file():
        raise CheckpointError(f"{kept}: no state kept after epoch {epoch} (train the source with KeepStateAfter)")
    if target_run.exists():
        raise CheckpointError(f"{target_run}: already exists; a branch starts a new run folder")
    saved = read_run_config(source_run)
    source_semi = SemiConfig(**(saved.get("semi") or {}))
    semi.validate(str(target_run))
    where = f"{target_run}: cannot branch from {source_run} after epoch {epoch}"
    for name, cfg in (("source", source_semi), ("branch", semi)):
        if cfg.mode == "none":
            raise ConfigError(f"{where}: the {name} trains without pseudo labels (semi.mode none), a different "
                              "epoch of the labelled images only")
        if cfg.warmup_epochs < epoch:
            raise ConfigError(f"{where}: the {name}'s warm-up ends after epoch {cfg.warmup_epochs}, before the "
                              "branch point")
    differing = [f.name for f in dataclasses.fields(SemiConfig)
                 if f.name not in AFTER_WARMUP and getattr(source_semi, f.name) != getattr(semi, f.name)]
    if differing:
        raise ConfigError(f"{where}: semi.{differing[0]} differs (the branch must draw the same labelled subset)")
    state = load_state_file(kept / LAST_STATE)
    if int(state.get("epoch", -1)) + 1 != epoch or CHECKPOINT_KEY not in state:
        raise CheckpointError(f"{kept / LAST_STATE}: not the state of a semi-supervised run after epoch {epoch}")

    target_run.mkdir(parents=True)
    (target_run / CKPT_DIR).mkdir()
    for name in STATE_FILES:
        if (kept / name).is_file():
            shutil.copyfile(kept / name, target_run / CKPT_DIR / name)
    for origin in [kept / "metrics.csv", *(source_run / name for name in COPIED)]:
        if origin.is_file():  # the per-epoch rows as of the branch point; the split and vocabularies as drawn
            shutil.copyfile(origin, target_run / origin.name)
    write_run_config(target_run, {**saved, "semi": dataclasses.asdict(semi)})
    atomic_write_json(target_run / BRANCH_FILE, {"source": str(source_run.resolve()), "after_epoch": epoch,
                                                 "source_semi": dataclasses.asdict(source_semi)})
    return target_run


__all__ = ["BRANCH_FILE", "KeepStateAfter", "branch_run", "kept_state_dir"]
