"""Train and store a report writer: a :class:`lvit.models.reporter.ZoneClassifier` that learns the six zone
flags of the training reports from the training images alone, so that a text-guided model can segment an image
that comes without a report (``lvit predict`` without ``--text``, ``lvit test --reports generated``).

``train_reporter(data_root, out)`` reads the train and val splits (their reports must follow LViT's template:
:func:`lvit.data.describe.parse_findings`), trains with binary cross-entropy per zone (AdamW, cosine schedule,
small affine and gamma augmentation, optional horizontal flips that swap the left and right flags), keeps the
epoch with the lowest validation loss, then chooses each zone's threshold on the validation split
(:func:`lvit.evaluate.reporter.choose_thresholds`). The images are read once and kept in memory at the writer's
size (uint8: 94 MB for QaTa-COV19's 5,716 training images at 128 px, gray).

A writer folder (``RUN/reporter/`` by default, so a run carries its writer; any folder with ``--out``)::

    reporter.json        model config, thresholds, allow_empty, capitalize, training settings, data, val scores
    weights.safetensors  the network's weights (best validation epoch)
    metrics.csv          epoch, train_loss, val_loss, val_exact, val_macro_f1, lr, seconds

Every file is written through :mod:`lvit.core.io` (atomic).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..artifacts.reporter_folder import FORMAT, FORMAT_VERSION, save_reporter
from ..core.errors import ConfigError, DataError
from ..data.flags import (
    FLIPPED_ZONES,
    OBJECTIVES,
    ZONE_NAMES,
    choose_thresholds,
    decode_flags,
    flag_metrics,
    report_flags,
)

METRICS_FILE = "metrics.csv"
METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_exact", "val_macro_f1", "lr", "seconds")


@dataclass
class ReporterTraining:
    """How a writer is trained (stored in ``reporter.json`` as ``training``)."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    augment: bool = True  # small affine (rotation, scale, shift) and gamma jitter
    hflip: float = 0.0  # probability of a horizontal flip (left and right flags swapped with it)
    objective: str = "f1"  # what the per-zone thresholds maximise on val: f1 | accuracy
    threads: int | None = None  # torch threads while training (None: leave torch's setting)
    mask_weight: float = 1.0  # weight of the auxiliary mask loss (models with a mask head only)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"reporter training: {name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"reporter training: lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ConfigError(f"reporter training: weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.hflip, (int, float)) and 0.0 <= self.hflip <= 1.0):
            raise ConfigError(f"reporter training: hflip must be a probability in [0, 1], got {self.hflip!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"reporter training: objective must be one of {', '.join(OBJECTIVES)}, "
                              f"got {self.objective!r}")
        if not (isinstance(self.mask_weight, (int, float)) and math.isfinite(self.mask_weight)
                and self.mask_weight >= 0):
            raise ConfigError(f"reporter training: mask_weight must be >= 0, got {self.mask_weight!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"reporter training: threads must be a positive integer, got {self.threads!r}")


@dataclass
class FlagData:
    """Images ``[N, C, S, S]`` uint8 and their zone flags ``[N, 6]`` float {0, 1}, with the records kept; with
    masks, the lesion fraction of each cell of an ``S/8`` grid ``[N, 1, S/8, S/8]`` (uint8, 255 = all lesion) and
    ``has_mask [N]`` bool."""

    images: torch.Tensor
    flags: torch.Tensor
    masks: torch.Tensor | None = None
    has_mask: torch.Tensor | None = None
    records: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (record name, why) of reports outside the template


def load_flag_data(records, image_size: int, in_channels: int = 1, what: str = "split",
                   progress: bool = False, masks: bool = False) -> FlagData:
    """Read the images of ``records`` at ``image_size`` (uint8 in memory) and the flags of their reports (with
    ``masks``, also each mask's lesion fraction on an ``image_size / 8`` grid; records without a mask get zeros
    and ``has_mask`` False).

    Records whose report does not follow LViT's template are left out (listed in ``skipped``); when none is left
    a DataError says so. A broken image is a DataError naming the file.
    """
    from tqdm import tqdm

    from ..data import prepare_image, read_image, read_mask

    kept, flags, skipped = [], [], []
    for r in records:
        try:
            flags.append(report_flags(r.text))
            kept.append(r)
        except ValueError:
            skipped.append((r.name, f"report not in LViT's template: {str(r.text)[:80]!r}"))
    if not kept:
        first = skipped[0][1] if skipped else "no images"
        raise DataError(None, f"{what}: no report in LViT's template to learn zone flags from "
                              f"({len(skipped)} report(s); first: {first})")
    images = torch.empty((len(kept), in_channels, image_size, image_size), dtype=torch.uint8)
    grid = image_size // 8
    coarse = torch.zeros((len(kept), 1, grid, grid), dtype=torch.uint8) if masks else None
    has_mask = torch.zeros(len(kept), dtype=torch.bool) if masks else None
    for i, r in enumerate(tqdm(kept, desc=f"reading {what}", unit="img", disable=not progress)):
        image = prepare_image(read_image(r.image_path), image_size, in_channels)
        images[i] = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        if masks and r.mask_path is not None:
            mask = torch.from_numpy(read_mask(r.mask_path)).float()[None, None]  # [1, 1, H, W] {0, 1}
            coarse[i] = F.adaptive_avg_pool2d(mask, grid)[0].mul(255.0).round_().to(torch.uint8)
            has_mask[i] = True
    return FlagData(images, torch.from_numpy(np.stack(flags).astype(np.float32)), masks=coarse, has_mask=has_mask,
                    records=kept, skipped=skipped)


def augment_batch(images: torch.Tensor, flags: torch.Tensor, generator: torch.Generator, *, augment: bool = True,
                  hflip: float = 0.0, rotate_deg: float = 8.0, scale: float = 0.08, translate: float = 0.04,
                  gamma: float = 0.25, masks: torch.Tensor | None = None):
    """Random small affine (rotation, scale, shift; border padding) and gamma per image of ``images [B, C, S, S]``
    float in [0, 1]; a horizontal flip (probability ``hflip``) also swaps the left and right flags. ``masks``
    (``[B, 1, s, s]`` float, any grid size) get the same geometry. Returns ``(images, flags)``, or ``(images,
    flags, masks)`` when masks are given."""
    b = images.shape[0]
    if augment:
        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(b, generator=generator)

        angle = torch.deg2rad(uniform(-rotate_deg, rotate_deg))
        s = uniform(1 - scale, 1 + scale)
        shift = uniform(-2 * translate, 2 * translate), uniform(-2 * translate, 2 * translate)  # grid units
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = torch.cos(angle) / s, -torch.sin(angle) / s, shift[0]
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = torch.sin(angle) / s, torch.cos(angle) / s, shift[1]
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if masks is not None:
            mask_grid = F.affine_grid(theta, list(masks.shape), align_corners=False)
            masks = F.grid_sample(masks, mask_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        exponent = torch.exp(uniform(-gamma, gamma)).view(b, 1, 1, 1)
        images = images.clamp(1e-6, 1.0).pow(exponent)
    if hflip > 0:
        flip = torch.rand(b, generator=generator) < hflip
        if flip.any():
            images = images.clone()
            flags = flags.clone()
            images[flip] = images[flip].flip(-1)
            flags[flip] = flags[flip][:, list(FLIPPED_ZONES)]
            if masks is not None:
                masks = masks.clone()
                masks[flip] = masks[flip].flip(-1)
    return (images, flags) if masks is None else (images, flags, masks)


@torch.no_grad()
def predict_probabilities(model, images_u8: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Zone scores ``[N, 6]`` (float64) of uint8 images ``[N, C, S, S]`` in eval mode."""
    model.eval()
    out = [torch.sigmoid(model(images_u8[i:i + batch_size].float().div_(255.0))).double()
           for i in range(0, len(images_u8), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 6))


def _bce(probs: np.ndarray, truth: np.ndarray) -> float:
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-(truth * np.log(p) + (1 - truth) * np.log(1 - p)).mean())


def train_reporter(data_root: str | Path, out: str | Path, *, model_config=None,
                   training: ReporterTraining | None = None, force: bool = False, progress: bool = True,
                   log: Callable[[str], None] | None = print) -> dict:
    """Train a report writer on ``data_root``'s train split, choose its thresholds on val, store it in ``out``.

    Returns the stored ``reporter.json`` content (with ``folder``). ``out`` must be new or empty unless ``force``.
    """
    from tqdm import tqdm

    from .. import __version__
    from ..core.io import prepare_output_dir
    from ..data import load_split
    from ..models.reporter import ReporterConfig, ZoneClassifier

    cfg = model_config if isinstance(model_config, ReporterConfig) else ReporterConfig.from_dict(model_config or {})
    tr = training or ReporterTraining()
    data_root = Path(data_root)
    train_records = load_split(data_root, "train")
    val_records = load_split(data_root, "val")
    if cfg.mask_head and not any(r.mask_path is not None for r in train_records):  # before reading any image
        raise DataError(data_root, "the report writer's mask head needs training masks and the train split has "
                                   "none: train without it (--no-mask-head)")
    out = prepare_output_dir(out, force, what="report writer folder")
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if tr.threads is not None:
        torch.set_num_threads(tr.threads)
    try:
        train = load_flag_data(train_records, cfg.image_size, cfg.in_channels, "train", progress,
                               masks=cfg.mask_head)
        if cfg.mask_head and not bool(train.has_mask.any()):
            raise DataError(data_root, "the report writer's mask head needs training masks and the train split has "
                                       "none: train without it (--no-mask-head)")
        val = load_flag_data(val_records, cfg.image_size, cfg.in_channels, "val", progress)
        for split, data in (("train", train), ("val", val)):
            if data.skipped:
                warnings.warn(f"{data_root} {split}: {len(data.skipped)} report(s) not in LViT's template left out "
                              f"(first: {data.skipped[0][0]}: {data.skipped[0][1]})", stacklevel=2)
        torch.manual_seed(tr.seed)
        generator = torch.Generator().manual_seed(tr.seed)
        model = ZoneClassifier(cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
        steps_per_epoch = math.ceil(len(train.images) / tr.batch_size)
        total = tr.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        val_truth = val.flags.numpy().astype(bool)
        rows, best = [], {"val_loss": math.inf}
        bar = tqdm(total=total, desc="lvit train-reporter", unit="batch", disable=not progress)
        for epoch in range(1, tr.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            order = torch.randperm(len(train.images), generator=generator)
            losses = []
            for start in range(0, len(order), tr.batch_size):
                idx = order[start:start + tr.batch_size]
                masks = train.masks[idx].float().div_(255.0) if cfg.mask_head else None
                images, flags, *rest = augment_batch(train.images[idx].float().div_(255.0), train.flags[idx],
                                                     generator, augment=tr.augment, hflip=tr.hflip, masks=masks)
                logits, mask_logits = model.forward_all(images)
                loss = F.binary_cross_entropy_with_logits(logits, flags)
                if mask_logits is not None and tr.mask_weight > 0:
                    keep = train.has_mask[idx]
                    if keep.any():
                        loss = loss + tr.mask_weight * F.binary_cross_entropy_with_logits(
                            mask_logits[keep], rest[0][keep])
                if not torch.isfinite(loss):
                    from ..core.errors import TrainingDiverged

                    raise TrainingDiverged(f"report writer: the loss became {loss.item()} in epoch {epoch}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update(1)
            probs = predict_probabilities(model, val.images)
            val_loss = _bce(probs, val_truth)
            at_half = flag_metrics(decode_flags(probs, [0.5] * 6, allow_empty=True), val_truth)
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                   "val_exact": at_half["exact"], "val_macro_f1": at_half["macro_f1"],
                   "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            bar.set_postfix(val_loss=f"{val_loss:.4f}", val_exact=f"{at_half['exact']:.3f}")
            _write_metrics(out / METRICS_FILE, rows)
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "epoch": epoch, "state": copy.deepcopy(model.state_dict()),
                        "probs": probs}
        bar.close()
        model.load_state_dict(best["state"])
        model.eval()
        allow_empty = bool((train.flags.sum(1) == 0).any())
        thresholds = choose_thresholds(best["probs"], val_truth, tr.objective)
        val_scores = {
            "thresholds_chosen": flag_metrics(decode_flags(best["probs"], thresholds, allow_empty), val_truth),
            "threshold_0.5": flag_metrics(decode_flags(best["probs"], [0.5] * 6, allow_empty), val_truth),
        }
        # The floor a writer must beat: always answering the training split's most frequent report.
        common_flags, common_count = max(
            ((row, int((train.flags == row).all(1).sum())) for row in torch.unique(train.flags, dim=0)),
            key=lambda item: item[1])
        baseline = flag_metrics(np.repeat(common_flags.numpy()[None].astype(bool), len(val_truth), axis=0), val_truth)
        val_scores["most_frequent_report"] = {"flags": [int(f) for f in common_flags.tolist()],
                                              "train_count": common_count, "exact": baseline["exact"],
                                              "macro_f1": baseline["macro_f1"]}
        beats = val_scores["thresholds_chosen"]["exact"] > baseline["exact"]
        val_scores["beats_most_frequent_report"] = bool(beats)
        capitalize = sum(str(r.text)[:1].isupper() for r in train.records) > len(train.records) / 2
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": cfg.to_dict(),
            "thresholds": [float(t) for t in thresholds],
            "zones": list(ZONE_NAMES),
            "allow_empty": allow_empty,
            "capitalize": bool(capitalize),
            "training": asdict(tr),
            "best_epoch": int(best["epoch"]),
            "best_val_loss": float(best["val_loss"]),
            "data": {"root": str(data_root.resolve()), "n_train": len(train.records), "n_val": len(val.records),
                     "skipped_train": len(train.skipped), "skipped_val": len(val.skipped),
                     "train_normal_fraction": float((train.flags.sum(1) == 0).float().mean())},
            "val": val_scores,
            "seconds": round(time.perf_counter() - started, 1),
            "lvit_version": __version__,
        }
        save_reporter(out, model, meta)
    finally:
        torch.set_num_threads(previous_threads)
    if not val_scores["beats_most_frequent_report"]:
        from ..core.errors import warn

        exact, floor = val_scores["thresholds_chosen"]["exact"], val_scores["most_frequent_report"]["exact"]
        warn(f"{out}: the report writer is no better than always writing the most frequent training report (exact "
             f"on val {exact:.3f} vs {floor:.3f}): its reports carry no information from the image; train it longer "
             "or on more data (recorded in reporter.json)")
    if log is not None:
        chosen = val_scores["thresholds_chosen"]
        log(f"report writer -> {out}: best epoch {meta['best_epoch']} of {tr.epochs}; val ({len(val.records)} "
            f"images): exact report {chosen['exact']:.3f}, zone accuracy {chosen['mean_accuracy']:.3f}, macro F1 "
            f"{chosen['macro_f1']:.3f} (thresholds {', '.join(f'{t:.3g}' for t in thresholds)}); "
            f"{meta['seconds'] / 60:.1f} min")
    return {**meta, "folder": str(out)}


def _write_metrics(path: Path, rows: list[dict]) -> None:
    from ..core.io import atomic_write_csv

    atomic_write_csv(path, rows, list(METRIC_COLUMNS))


__all__ = ["FlagData", "ReporterTraining", "augment_batch", "load_flag_data", "predict_probabilities", "train_reporter"]
