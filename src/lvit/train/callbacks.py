"""The run-folder callback: per-epoch CSV/TensorBoard rows, best/last weights, full state for ``--resume``;
and a wall-clock budget for benchmarks.

It subclasses Lightning's :class:`Checkpoint`, so Lightning runs it after the other callbacks (the early
stopping state it saves is already updated for the epoch) and adds no default ModelCheckpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint

from ..artifacts.runs import BEST_WEIGHTS, CKPT_DIR, LAST_STATE, LAST_WEIGHTS, save_weights
from ..core.io import atomic_write_csv
from .checkpoint import rng_state, set_rng_state

CSV_COLUMNS = ("epoch", "train_loss", "val_loss", "val_dice", "val_iou", "lr", "best", "seconds")


class RunCheckpoint(Checkpoint):
    def __init__(self, run_dir: str | Path):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = []
        self.best_dice = -math.inf
        self.best_epoch = -1
        self._epoch_started = 0.0
        self._threads_before: int | None = None  # torch threads of the session that wrote the resumed checkpoint

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CKPT_DIR

    @property
    def state_key(self) -> str:
        return "RunCheckpoint"

    # ------------------------------------------------------------------ epoch hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        threads = torch.get_num_threads()
        if self._threads_before not in (None, threads) and pl_module.device.type == "cpu" and trainer.is_global_zero:
            from ..core.errors import warn

            # CPU kernels split their sums by thread, so another count rounds differently: not restorable.
            warn(f"{self.run_dir}: resumed with {threads} torch thread(s), trained so far with "
                 f"{self._threads_before}: the arithmetic from here on differs slightly from an uninterrupted run's "
                 f"(OMP_NUM_THREADS={self._threads_before} continues it exactly)")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = pl_module.train_epoch_results()  # all processes (DDP-synced metrics)
        epoch = trainer.current_epoch
        dice = results.get("val_dice", float("nan"))
        is_best = not math.isnan(dice) and dice > self.best_dice
        if is_best:
            self.best_dice, self.best_epoch = dice, epoch
        row = {"epoch": epoch + 1, **{k: results.get(k, float("nan")) for k in CSV_COLUMNS[1:6]},
               "best": int(is_best), "seconds": round(time.perf_counter() - self._epoch_started, 2),
               **{k: v for k, v in results.items() if k not in CSV_COLUMNS}}  # extension figures
        self.rows.append(row)
        if trainer.is_global_zero:
            self._write_csv()
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"epoch/{k}": float(v) for k, v in row.items()
                                            if k not in ("epoch", "best")}, step=epoch)
            meta = {"format": "lvit", "epoch": str(epoch + 1), "val_dice": f"{dice:.6f}"}
            # The weights validated this epoch (a mean-teacher run validates its teacher).
            chosen = getattr(pl_module, "weights_to_save", None)
            model, embedding = chosen() if chosen is not None else (pl_module.model, pl_module.text_embedding)
            save_weights(self.ckpt_dir / LAST_WEIGHTS, model, embedding, meta)
            if is_best:
                save_weights(self.ckpt_dir / BEST_WEIGHTS, model, embedding, meta)
        # Full state last (every process takes part; rank 0 writes): a kill before this line resumes from
        # the previous epoch and recomputes this one identically.
        trainer.save_checkpoint(self.ckpt_dir / LAST_STATE)

    def _write_csv(self) -> None:
        # Extra per-epoch figures an extension module returns (lvit.train.semi: pseudo_dice ...) follow the
        # standard columns.
        extra = [k for r in self.rows for k in r if k not in CSV_COLUMNS]
        atomic_write_csv(self.run_dir / "metrics.csv", self.rows, list(CSV_COLUMNS) + list(dict.fromkeys(extra)))

    # ------------------------------------------------------------------ state (in last.ckpt)
    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "best_dice": float(self.best_dice),
                "best_epoch": int(self.best_epoch), "rng": rng_state(), "torch_threads": torch.get_num_threads()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]
        self.best_dice = float(state_dict.get("best_dice", -math.inf))
        self.best_epoch = int(state_dict.get("best_epoch", -1))
        self._threads_before = state_dict.get("torch_threads")
        if state_dict.get("rng") is not None:
            # Restored here, while Lightning loads the checkpoint: before it builds the first data iterator
            # (which already draws the shuffle order and prefetches an augmented batch), so the resumed run
            # draws exactly what the uninterrupted run drew after saving. Under DDP every process resumes
            # from rank 0's streams (shuffling itself is epoch-seeded by the DistributedSampler).
            set_rng_state(state_dict["rng"])


class WallClockBudget(pl.Callback):
    """Stop at the end of an epoch when the next one (at the mean epoch time so far) would overrun ``minutes``.

    Benchmarks use it to fit a lent machine's time. Stateless on purpose: a ``--resume`` call gets a fresh budget
    (Lightning's Timer would restore the time already spent and stop at once)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60.0
        self.started = time.perf_counter()
        self.epochs = 0
        self.stopped = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs += 1
        elapsed = time.perf_counter() - self.started
        if elapsed + elapsed / self.epochs > self.seconds:
            trainer.should_stop = True
            self.stopped = True
