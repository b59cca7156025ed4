"""Several semi-supervised variants from one shared warm-up: keep a run's state after epoch N, start others there.

A mean-teacher run's warm-up is the same labelled-only epochs (lvit.train.semi.sampler.PairedSampler), so it
branches from an EPI run's kept state too (its teacher starts as a copy of the student at the warm-up's end).

Why: during the warm-up a semi-supervised run trains on labelled batches only, drawn by an order that depends on
the seed and the epoch alone (:class:`~lvit.train.semi.sampler.WarmupSampler`), so two runs that differ only in
what happens after the warm-up (EPI or EPI + LV, the momentum, the LV weight, a longer warm-up) are the same run
for their first N epochs, bit for bit. Training those epochs once and branching the variants from the saved
state gives exactly the runs trained from scratch (the branch resumes a full-state checkpoint, which is exact),
for the cost of the epochs after the branch point.

    train(config, data, run_dir, plugins=[Callbacks(KeepStateAfter(run_dir, 5))])   # the shared warm-up
    branch_run(run_dir, 5, other_dir, other_config)                                 # semi settings differ
    train(resume_config(other_dir)[0], data, other_dir, resume=True)

A branched run folder records where it started in ``branched_from.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import yaml

from ...artifacts.runs import (
    BEST_WEIGHTS,
    CKPT_DIR,
    CONFIG_NAME,
    LAST_STATE,
    LAST_WEIGHTS,
    load_state_file,
    short_reason,
    write_run_config,
)
from ...core.errors import CheckpointError, ConfigError, LvitError
from ...core.io import atomic_write_json
from ..config import MEAN_TEACHER_KEYS, TrainConfig
from .labelled_subset import SUBSET_FILE
from .mean_teacher import CHECKPOINT_KEY as MT_CHECKPOINT_KEY
from .module import CHECKPOINT_KEY

BRANCH_FILE = "branched_from.json"
STATE_FILES = (LAST_WEIGHTS, BEST_WEIGHTS, LAST_STATE)
RUN_FILES = (CONFIG_NAME, "metrics.csv", SUBSET_FILE, "report_words.json", "vocab.json")
# Settings that act only once pseudo labels start: runs differing in these share their warm-up epochs.
AFTER_WARMUP = ("mode", "warmup_epochs", "beta", "lv_weight", "pseudo_threshold", "lv_contrast", "lv_encoder",
                "lv_max_tokens", "storage", *MEAN_TEACHER_KEYS)
# Settings that change how a run is shown or fed, not what it computes; model.text_dim follows the text encoder
# (the saved config has the encoder's width, a preset may not).
NOT_COMPARED = {("trainer", "progress"), ("trainer", "log_every_n_steps"), ("data", "num_workers"),
                ("model", "text_dim")}
KEPT_PREFIX = "after-epoch-"


def kept_state_dir(run_dir: str | Path, epoch: int) -> Path:
    """Where :class:`KeepStateAfter` keeps a run's state after ``epoch`` (1-based) epochs."""
    return Path(run_dir) / CKPT_DIR / f"{KEPT_PREFIX}{int(epoch)}"


def _copy_into_place(files: list[Path], dest: Path) -> None:
    """Copy ``files`` into a hidden sibling of ``dest``, then rename it to ``dest``: a crash leaves either the
    old folder or the new one, never a half-made one under ``dest``'s name."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, tmp / f.name)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class KeepStateAfter(pl.Callback):
    """Keep the run's full state (``last.ckpt``, the last/best weights, ``config.yaml``, ``metrics.csv``, the
    labelled subset) once ``epochs`` epochs have finished, in ``checkpoints/after-epoch-N/``.

    Copied when the next epoch starts (the run-folder callback writes ``last.ckpt`` as the last act of an epoch,
    after every other callback's epoch-end hook), or when training ends right after that epoch. A kept state
    from beyond the epoch a run starts at is removed then: a forced restart or a resume from an earlier state
    makes it anew."""

    def __init__(self, run_dir: str | Path, *epochs: int):
        self.run_dir = Path(run_dir)
        self.epochs = {int(e) for e in epochs}
        if not self.epochs or min(self.epochs) < 1:
            raise ConfigError(f"keep the state after at least one epoch (>= 1), got {sorted(self.epochs)}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for kept in (self.run_dir / CKPT_DIR).glob(f"{KEPT_PREFIX}*"):
            suffix = kept.name[len(KEPT_PREFIX):]
            if suffix.isdigit() and int(suffix) > trainer.current_epoch:
                shutil.rmtree(kept)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._keep(trainer, trainer.current_epoch)  # epochs finished

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._keep(trainer, trainer.fit_loop.epoch_progress.current.completed)

    def _keep(self, trainer: pl.Trainer, finished: int) -> None:
        if finished not in self.epochs or not trainer.is_global_zero:
            return
        ckpt = self.run_dir / CKPT_DIR
        files = [self.run_dir / n for n in RUN_FILES] + [ckpt / n for n in STATE_FILES]
        _copy_into_place([f for f in files if f.is_file()], kept_state_dir(self.run_dir, finished))


def _differences(a: dict, b: dict, prefix: tuple = ()) -> list[str]:
    keys = sorted(set(a) | set(b), key=str)
    out = []
    for k in keys:
        path = (*prefix, k)
        if path in NOT_COMPARED:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, path)
        elif va != vb:
            out.append(".".join(map(str, path)))
    return out


def branch_run(source_run: str | Path, epoch: int, target_run: str | Path, config: TrainConfig) -> Path:
    """Make ``target_run`` the state of ``source_run`` after ``epoch`` epochs, to be trained on as ``config``;
    continue it with ``train(..., resume=True)``.

    Refused in one line unless the kept state exists and is that epoch's, ``config`` equals the source's config
    outside the settings that act after the warm-up (:data:`AFTER_WARMUP`; the labelled subset included), and
    both runs are still in their warm-up at that epoch (pseudo labels on in both, ``warmup_epochs >= epoch``).
    ``target_run`` must not exist yet; it appears whole or not at all.
    """
    source_run, target_run = Path(source_run), Path(target_run)
    epoch = int(epoch)
    kept = kept_state_dir(source_run, epoch)
    if not (kept / LAST_STATE).is_file() or not (kept / CONFIG_NAME).is_file():
        raise CheckpointError(f"{kept}: no state kept after epoch {epoch} (train the source with KeepStateAfter)")
    if target_run.exists():
        raise CheckpointError(f"{target_run}: already exists; a branch starts a new run folder")
    where = f"{target_run}: cannot branch from {source_run} after epoch {epoch}"
    try:
        saved = yaml.safe_load((kept / CONFIG_NAME).read_text(encoding="utf-8"))
        source = TrainConfig.from_dict({k: v for k, v in saved.items()
                                        if k not in ("lvit_version", "text_encoder", "data_info")},
                                       source=str(kept / CONFIG_NAME))
    except (OSError, yaml.YAMLError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{kept / CONFIG_NAME}: unreadable run config ({short_reason(str(exc))})") from None
    config.validate(str(target_run))
    for name, semi in (("source", source.semi), ("branch", config.semi)):
        if semi.mode == "none":
            raise ConfigError(f"{where}: the {name} trains without pseudo labels (semi.mode none), a different "
                              "epoch of the labelled images only")
        if semi.warmup_epochs < epoch:
            raise ConfigError(f"{where}: the {name}'s warm-up ends after epoch {semi.warmup_epochs}, before the "
                              "branch point")
    mine, theirs = config.to_dict(), source.to_dict()
    for d in (mine, theirs):
        d["semi"] = {k: v for k, v in d["semi"].items() if k not in AFTER_WARMUP}
    differing = _differences(mine, theirs)
    if differing:
        raise ConfigError(f"{where}: {differing[0]} differs (only semi.{', semi.'.join(AFTER_WARMUP)} may)")
    if source.semi.mode == "mean-teacher" and config.semi.mode != "mean-teacher":
        raise ConfigError(f"{where}: the source is a mean-teacher run; branch EPI variants from an EPI run")
    state = load_state_file(kept / LAST_STATE)
    if int(state.get("epoch", -1)) + 1 != epoch or not ({CHECKPOINT_KEY, MT_CHECKPOINT_KEY} & set(state)):
        raise CheckpointError(f"{kept / LAST_STATE}: not the state of a semi-supervised run after epoch {epoch}")

    run_config = copy.deepcopy(saved)
    run_config["semi"] = dataclasses.asdict(config.semi)
    for section, key in NOT_COMPARED - {("model", "text_dim")}:
        run_config[section][key] = getattr(getattr(config, section), key)
    staging = target_run.with_name(f".{target_run.name}.branch-{os.getpid()}")
    try:
        (staging / CKPT_DIR).mkdir(parents=True)  # the staging folder is the unit that appears whole
        for name in STATE_FILES:
            if (kept / name).is_file():
                shutil.copyfile(kept / name, staging / CKPT_DIR / name)
        for name in RUN_FILES[1:]:
            if (kept / name).is_file():
                shutil.copyfile(kept / name, staging / name)
        write_run_config(staging, run_config)
        atomic_write_json(staging / BRANCH_FILE, {"source": str(source_run.resolve()), "after_epoch": epoch,
                                                  "source_semi": dataclasses.asdict(source.semi)})
        os.rename(staging, target_run)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise LvitError(f"{target_run}: branch not made ({short_reason(str(exc))})") from None
        raise
    return target_run


__all__ = ["BRANCH_FILE", "KeepStateAfter", "branch_run", "kept_state_dir"]
