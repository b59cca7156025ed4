"""``train()``: one call from a config to a finished run folder (Lightning drives the loop).

Lightning supplies the loop, precision (32 / bf16 autocast on CPU / fp16 or bf16 AMP on GPU), gradient
clipping, early stopping, progress bars, TensorBoard and DDP (``trainer.devices`` / ``trainer.num_nodes`` or
torchrun); :class:`~lvit.train.callbacks.RunCheckpoint` writes the run folder (see
:mod:`lvit.train.checkpoint`).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch

from .. import __version__
from ..artifacts.runs import CKPT_DIR, LAST_STATE, LOCK_NAME, read_run_config, run_lock, write_run_config
from ..core.errors import CheckpointError, ConfigError
from ..core.io import prepare_output_dir
from .callbacks import RunCheckpoint
from .checkpoint import SafeCheckpointIO, rng_state, set_rng_state
from .config import TrainConfig, apply_override, flat_settings
from .datamodule import build_train_data, describe_encoder, record_training_words
from .init_from import load_matching, summary_line
from .init_from import write_report as write_init_report
from .module import SegmentationModule
from .plugins import TrainingPlugin

RUN_ONLY_KEYS = ("lvit_version", "text_encoder", "data_info")


@dataclass
class TrainResult:
    run_dir: Path
    best_dice: float
    best_epoch: int  # 1-based; 0 when no epoch finished
    epochs: int  # epochs finished in total (including those before a resume)
    stopped_early: bool
    seconds: float  # wall time of this call


#: Settings a resumed run may change: how long it trains and how it reports, never what it learns with (a longer
#: run is extended across sessions with a larger trainer.max_epochs).
RESUMABLE_SETTINGS = ("trainer.max_epochs", "trainer.patience", "trainer.progress", "trainer.log_every_n_steps",
                      "data.num_workers", "text.cache_dir")


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    """The config saved in a run folder (plus overrides such as ``trainer.max_epochs=...``) and its data root.
    Overrides of settings a resume cannot change (anything outside :data:`RESUMABLE_SETTINGS`) are refused in
    one line before anything is written, so the run folder stays as it was."""
    state_path = Path(run_dir) / CKPT_DIR / LAST_STATE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: nothing to resume (no full-state checkpoint in this run folder)")
    saved = read_run_config(run_dir)
    data = {k: v for k, v in saved.items() if k not in RUN_ONLY_KEYS}
    source = str(Path(run_dir) / "config.yaml")
    before = flat_settings(TrainConfig.from_dict(data, source=source).to_dict())
    for item in overrides or []:
        apply_override(data, item)
    config = TrainConfig.from_dict(data, source=source)
    changed = [key for key, value in flat_settings(config.to_dict()).items()
               if before.get(key) != value and key not in RESUMABLE_SETTINGS]
    if changed:
        raise ConfigError(f"{run_dir}: a resumed run cannot change {', '.join(changed)} (it continues the saved "
                          f"weights and optimizer); only {', '.join(RESUMABLE_SETTINGS)} can change. Start a new "
                          "run (--init-from to start from these weights)")
    workers_before, workers_now = before.get("data.num_workers", 0), config.data.num_workers
    if (workers_before > 0) != (workers_now > 0):
        from ..core.errors import warn

        # In-process loading draws each item's augmentation from the main stream between the training steps;
        # worker loading draws them all at the epoch's start (lvit.train.datamodule.SeedsFromMain). Both are
        # deterministic, but they are different draws.
        warn(f"{run_dir}: data.num_workers {workers_before} -> {workers_now}: loading "
             f"{'in worker processes' if workers_now else 'in the training process'} draws other augmentations "
             "than the run drew so far, so from here on it differs from an uninterrupted run (any number of "
             "workers above 0 draws alike)")
    root = (saved.get("data_info") or {}).get("root")
    return config, root


def split_fingerprint(train_records, val_records) -> str:
    """sha256 (16 hex digits) of the training and validation lists: image names, mask presence and reports."""
    import hashlib

    digest = hashlib.sha256()
    for split, records in (("train", train_records), ("val", val_records)):
        for r in records:
            digest.update(f"{split}\t{r.name}\t{r.mask_path is not None}\t{r.text}\n".encode())
    return digest.hexdigest()[:16]


def _compare_data(run_dir: Path, now: dict) -> dict:
    """On resume: say when the data differs from what the run trained on so far, and keep that history."""
    from ..core.errors import warn

    before = read_run_config(run_dir).get("data_info") or {}
    history = list(before.get("earlier") or [])
    old = {k: before.get(k) for k in ("root", "n_train", "n_val", "fingerprint")}
    if old.get("fingerprint") is not None and old["fingerprint"] != now["fingerprint"] or \
            old.get("root") not in (None, now["root"]):
        warn(f"{run_dir}: resumed on other data than it trained on so far: {now['root']} ({now['n_train']} train / "
             f"{now['n_val']} val, fingerprint {now['fingerprint']}) instead of {old['root']} ({old['n_train']} / "
             f"{old['n_val']}, fingerprint {old.get('fingerprint') or 'not recorded'}); both are kept in config.yaml")
        history.append(old)
    return {**now, "earlier": history} if history else now


def _trainer_kwargs(config: TrainConfig) -> dict:
    t = config.trainer
    devices = t.devices
    n_proc = (devices if isinstance(devices, int) else 1) * t.num_nodes
    strategy = t.strategy
    if strategy == "auto" and n_proc > 1:
        strategy = "ddp"  # one process per device, launched by Lightning (or torchrun)
    precision = "32-true" if str(t.precision) == "32" else str(t.precision)
    return dict(
        max_epochs=t.max_epochs,
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=precision,
        gradient_clip_val=config.optim.grad_clip,
        gradient_clip_algorithm="norm",
        # Deterministic kernels where they exist; on GPU some have none, so only warn there.
        deterministic=(True if t.deterministic and not torch.cuda.is_available() else
                       ("warn" if t.deterministic else False)),
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress,
        enable_model_summary=False,
        check_val_every_n_epoch=1,
    )


def train(
    config: TrainConfig,
    data_root: str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    plugins: Sequence[TrainingPlugin] = (),
) -> TrainResult:
    """Train ``config`` on the dataset at ``data_root`` into ``run_dir``.

    ``resume=True`` continues ``run_dir/checkpoints/last.ckpt`` exactly (weights, optimizer, scheduler,
    epoch, early-stopping state, RNG). Otherwise ``run_dir`` must be new or empty unless ``force``.
    ``plugins``: :class:`~lvit.train.plugins.TrainingPlugin` instances (the one extension point: data set-up,
    the module, callbacks); semi-supervised training is added automatically when ``config.semi`` is active.
    The run folder is locked meanwhile (:func:`lvit.artifacts.runs.run_lock`): a second training into it is refused.
    """
    if not _launched_as_rank_zero():  # DDP's extra processes join the run the first one holds
        return _train(config, data_root, run_dir, resume=resume, force=force, plugins=plugins)
    with run_lock(run_dir):
        return _train(config, data_root, run_dir, resume=resume, force=force, plugins=plugins)


def _train(config: TrainConfig, data_root: str | Path, run_dir: str | Path, *, resume: bool, force: bool,
           plugins: Sequence[TrainingPlugin]) -> TrainResult:
    from ..models import build_model

    started = time.perf_counter()
    run_dir = Path(run_dir)
    state_path = run_dir / CKPT_DIR / LAST_STATE
    if resume:
        if not state_path.is_file():
            raise CheckpointError(f"{state_path}: nothing to resume (no full-state checkpoint in this run folder)")
    elif _launched_as_rank_zero():
        clear_failed_start(run_dir)  # the stub of a run that failed before its first checkpoint
        prepare_output_dir(run_dir, force=force, what="run folder", ignore=(LOCK_NAME,))
    if data_root is None:
        raise ConfigError("no dataset: pass --data ROOT (or set data.root in the config)")
    data_root = Path(data_root)
    seed = config.trainer.seed
    _quiet_lightning()
    pl.seed_everything(seed, workers=True, verbose=False)

    data = build_train_data(config, data_root)  # may set config.model.text_dim from the encoder
    teacher = None
    if config.loss.distill_teacher:  # refused in one line before anything is written into the run folder
        from .teacher import check_same_teacher, load_distill_teacher

        before = rng_state()  # building the teacher's network draws initial weights: not from the run's stream
        teacher, teacher_record = load_distill_teacher(
            config.loss.distill_teacher, config.model, describe_encoder(data.encoder),
            learns_text=bool(getattr(data.encoder, "trainable", False)))
        set_rng_state(before)
        if resume:
            check_same_teacher(run_dir, teacher_record)
    plugins = list(plugins)
    if config.semi.active:
        from .semi.module import SemiSupervisedPlugin

        plugins.insert(0, SemiSupervisedPlugin())
    if config.fast.enabled:  # the fast GPU path (lvit.train.fast): datasets on the device, its module first
        from .fast import FastPathPlugin

        plugins.insert(0, FastPathPlugin())
    # A plug-in's set-up may draw random numbers (an encoder loaded on a text-cache miss); the model's start and
    # the training draws must not depend on which plug-ins ran or whether a cache was warm.
    before = rng_state()
    for plugin in plugins:
        data = plugin.setup(config, data, data_root, run_dir, resume)
    set_rng_state(before)
    model = build_model(config.model_name, config.model)  # initialised from the seed: same start every time
    if config.trainer.init_from and not resume:
        init_report = load_matching(model, config.trainer.init_from)  # CheckpointError when nothing matches
    text_embedding = None
    text_info = describe_encoder(data.encoder)
    if data.encoder is not None and getattr(data.encoder, "trainable", False):
        text_embedding = data.encoder.build_module(config.model.text_dim, seed=seed)
        if _launched_as_rank_zero():
            data.encoder.save(run_dir / "vocab.json")
        text_info["spec"] = "learned:vocab.json"  # relative to the run folder
    data_info = {"root": str(data_root.resolve()), "n_train": len(data.train), "n_val": len(data.val),
                 "image_size": config.model.image_size, "in_channels": config.model.in_channels,
                 "fingerprint": split_fingerprint(data.train.records, data.val.records)}
    if resume:
        data_info = _compare_data(run_dir, data_info)
    run_config = {
        "lvit_version": __version__,
        **config.to_dict(),
        "text_encoder": text_info,
        "data_info": data_info,
    }
    if _launched_as_rank_zero():
        write_run_config(run_dir, run_config)
        if config.trainer.init_from and not resume:
            write_init_report(run_dir, init_report)
            print(summary_line(init_report), flush=True)
        if teacher is not None:
            from .teacher import write_teacher_record

            write_teacher_record(run_dir, teacher_record)
            print(f"distilling from {teacher_record['weights']} (sha256 {teacher_record['sha256'][:12]})", flush=True)
        record_training_words(run_dir, data)  # report_words.json: what lvit predict checks reports against

    module = next((m for m in (p.make_module(model, config, text_embedding) for p in plugins) if m is not None),
                  None) or SegmentationModule(model, config, text_embedding)
    if teacher is not None:
        module.set_distill_teacher(teacher)
    run_callback = RunCheckpoint(run_dir)
    callbacks = [run_callback]
    early = None
    if config.trainer.patience:
        from lightning.pytorch.callbacks import EarlyStopping

        early = EarlyStopping(monitor="val_dice", mode="max", patience=config.trainer.patience,
                              check_on_train_epoch_end=False, check_finite=False)
        callbacks.insert(0, early)
    callbacks += [cb for plugin in plugins for cb in plugin.callbacks()]
    logger = _tensorboard_logger(run_dir)
    try:
        trainer = pl.Trainer(callbacks=callbacks, logger=logger, default_root_dir=str(run_dir),
                             plugins=[SafeCheckpointIO()], **_trainer_kwargs(config))
    except (ValueError, RuntimeError) as exc:  # Lightning's MisconfigurationException is a ValueError
        raise ConfigError(f"trainer settings: {str(exc).splitlines()[0]}") from None
    train_loader, val_loader = data.loaders(config)
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(state_path) if resume else None,
                weights_only=True)
    best = run_callback.best_dice
    return TrainResult(
        run_dir=run_dir,
        best_dice=best if math.isfinite(best) else float("nan"),
        best_epoch=run_callback.best_epoch + 1,
        epochs=len(run_callback.rows),
        stopped_early=bool(early is not None and early.stopped_epoch > 0),
        seconds=time.perf_counter() - started,
    )


# What a run folder holds before its first checkpoint (a run that failed or was killed that early).
_STUB_ENTRIES = {"config.yaml", "tensorboard", "vocab.json", "report_words.json", "checkpoints"}


def clear_failed_start(run_dir: str | Path) -> list[str]:
    """Remove the leftovers of a run that stopped before its first checkpoint, so the retry needs no --force.

    Acts only when ``run_dir`` holds nothing but such leftovers: an lvit ``config.yaml`` plus ``tensorboard/``,
    ``vocab.json``, ``report_words.json``, an empty ``checkpoints/`` and temporary files; anything else (weights,
    metrics.csv, a file of the user's) leaves the folder untouched. Returns the names removed (warned about).
    """
    import shutil

    from ..core.errors import warn

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        return []
    entries = [e for e in run_dir.iterdir() if e.name != LOCK_NAME]  # the lock is this training's own
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            continue
        if entry.name not in _STUB_ENTRIES:
            return []
        if entry.name == "checkpoints" and (not entry.is_dir() or any(not p.name.endswith(".tmp")
                                                                      for p in entry.iterdir())):
            return []
    try:
        read_run_config(run_dir)
    except CheckpointError:
        return []
    removed = []
    for entry in entries:
        removed.append(entry.name + ("/" if entry.is_dir() else ""))
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    warn(f"{run_dir}: removed the leftovers of a run that stopped before its first checkpoint "
         f"({', '.join(sorted(removed))})")
    return removed


def _launched_as_rank_zero() -> bool:
    """False in the extra processes of a DDP run (Lightning's launcher or torchrun set these variables):
    only the first process checks and writes the run folder; the others join it."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _tensorboard_logger(run_dir: Path):
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)
    except (ImportError, ModuleNotFoundError):  # tensorboard missing: metrics.csv is still written
        return False


def _quiet_lightning() -> None:
    """Keep the console to the progress bar and our summary (no tips, no device banners)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


__all__ = ["TrainResult", "resume_config", "train"]
