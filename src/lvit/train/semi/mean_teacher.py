"""Mean teacher with confidence-masked hard pseudo labels and weak/strong views (``semi.mode: mean-teacher``).

A recipe beside the paper's EPI + LV (docs/SEMI_SUPERVISED.md, "Mean teacher"). Per optimizer step:

    teacher (EMA copy of the network, eval mode) on the weak view of the unlabelled images -> probabilities p
    hard pseudo label y = [p >= 0.5], counted only where the teacher is confident: p <= 1 - c or p >= c
    student on labelled images (usual augmentation) and on the strong view of the unlabelled ones:
        loss = supervised(labelled) + w(t) * consistency(student on the strong view, y, confident pixels)
    after the step: teacher = d * teacher + (1 - d) * student

The weak view is the unlabelled image as loaded (resized, no augmentation); the strong view is the same tensor
with intensity jitter, noise and a cut-out square. Neither moves a pixel, so the teacher's label at a pixel is
the label of the student's pixel. The cut-out pixels carry no image evidence and are left out of the loss.
With ``semi.cutmix`` the strong view of an image also gets a box of the strong view of another unlabelled image
of the batch **with the same report**, and its pseudo label the teacher's label of that box (report-aware
CutMix): the student must find a lesion pasted from another patient, and every lesion it sees lies in a zone its
report names (a pasted box may hide a named one).

Why these choices (measured on QaTa-COV19 with EPI, docs/SEMI_SUPERVISED.md): EPI's pseudo labels froze while the
student overtook them (here they come from an EMA of the student that trails it by ~1 / (1 - d) steps and are
made fresh every step), and the unlabelled images took three quarters of every batch (here each step carries a
full labelled batch, exactly the steps-matched baseline's, plus the unlabelled images on top: PairedSampler).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from ...core.errors import CheckpointError
from ...core.metrics import batch_dice_iou
from ..ema import ema_update
from ..losses import OFFICIAL_DICE_SMOOTH
from ..module import SegmentationModule
from .sampler import PairedSampler

CHECKPOINT_KEY = "mean_teacher"


# ---------------------------------------------------------------------- the pieces
def sigmoid_rampup(progress: float, length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(progress / length, 0, 1)`` (Laine & Aila's ramp-up); 1 when
    ``length`` is 0. ``progress`` in epochs since the consistency term started."""
    if length <= 0:
        return 1.0
    t = min(max(progress / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def consistency_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, confidence: float,
                     keep: torch.Tensor | None = None, dice_weight: float = 0.5,
                     bce_weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's loss against the teacher's confident hard labels; returns (loss, fraction of pixels used).

    ``logits`` (student) and ``teacher_probs`` ``[U, 1, H, W]``; ``keep`` bool ``[U, 1, H, W]`` (False: a pixel
    the strong view cut out; None: all kept). With ``y = [p >= 0.5]`` and the used pixels
    ``m = keep & (p <= 1 - confidence or p >= confidence)``, the supervised loss's two terms restricted to m:

    * soft Dice per image, squared denominators as the official loss:
      ``1 - (2 sum(m q y) + s) / (sum(m q^2) + sum(m y) + s)``, q = sigmoid(logits), s = 4e-5, averaged over the
      images with at least one used lesion pixel (0 without any). An image whose used pixels are all background
      scores ~1 whatever the student does short of predicting exactly 0, so it would only teach "predict
      nothing" - what a still weak teacher, confident about background first, would otherwise teach;
    * class-balanced BCE pooled over the batch: ``0.5 sum(m y bce) / sum(keep y) + 0.5 sum(m (1-y) bce) /
      sum(keep (1-y))``. Each class is averaged over all of its kept pixels, so unconfident pixels count as 0
      and the term grows to the supervised loss's scale as the teacher grows confident (FixMatch's
      normalisation), instead of giving a handful of confident pixels a full class's weight.
    """
    p = teacher_probs.detach().float()
    keep = torch.ones_like(p, dtype=torch.bool) if keep is None else keep.bool()
    y = (p >= 0.5).float()
    used = (keep & ((p <= 1.0 - confidence) | (p >= confidence))).float()
    kept = keep.float()
    logits = logits.float()
    q = torch.sigmoid(logits)
    dims = tuple(range(1, q.dim()))
    inter = (used * q * y).sum(dims)
    lesion = (used * y).sum(dims)
    denom = (used * q * q).sum(dims) + lesion
    per_image = 1.0 - (2.0 * inter + OFFICIAL_DICE_SMOOTH) / (denom + OFFICIAL_DICE_SMOOTH)
    counted = (lesion > 0).float()
    dice = (per_image * counted).sum() / counted.sum().clamp_min(1.0)
    bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    pos = (used * y * bce).sum() / ((kept * y).sum() + 1e-12)
    neg = (used * (1.0 - y) * bce).sum() / ((kept * (1.0 - y)).sum() + 1e-12)
    loss = dice_weight * dice + bce_weight * (0.5 * pos + 0.5 * neg)
    return loss, used.sum() / kept.sum().clamp_min(1.0)


@dataclass(frozen=True)
class StrongAugment:
    """The strong view: per image, contrast, brightness, gamma, Gaussian noise, and (with ``cutout_prob``) one
    square filled with the image's mean. The same jitter for every channel (X-rays are grey) and nothing that
    moves a pixel."""

    contrast: tuple[float, float] = (0.6, 1.4)  # x -> mean + a (x - mean)
    brightness: float = 0.1  # + U(-b, b)
    gamma: tuple[float, float] = (0.7, 1.5)  # x -> x ** g (on [0, 1])
    noise_std: float = 0.04  # + N(0, s^2) per pixel, s ~ U(0, noise_std)
    cutout_prob: float = 0.5
    cutout_side: tuple[float, float] = (0.15, 0.35)  # square side as a fraction of the image side

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [U, C, H, W]`` in [0, 1] -> (strong view, keep ``[U, 1, H, W]`` bool: False where cut out).
        Random numbers come from ``generator`` (CPU) only: the run's global random streams are untouched."""
        n, _, h, w = images.shape
        device = images.device

        def uniform(lo, hi, size=(n,)):
            return (lo + (hi - lo) * torch.rand(size, generator=generator)).to(device)

        x = images.float()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + uniform(*self.contrast).view(n, 1, 1, 1) * (x - mean)
        x = x + uniform(-self.brightness, self.brightness).view(n, 1, 1, 1)
        x = x.clamp(0.0, 1.0) ** uniform(*self.gamma).view(n, 1, 1, 1)
        noise = torch.randn((n, 1, h, w), generator=generator).to(device)
        x = (x + uniform(0.0, self.noise_std).view(n, 1, 1, 1) * noise).clamp(0.0, 1.0)
        keep = torch.ones((n, 1, h, w), dtype=torch.bool, device=device)
        cut = torch.rand(n, generator=generator) < self.cutout_prob
        sides = torch.rand(n, generator=generator)
        corners = torch.rand((n, 2), generator=generator)
        for i in torch.nonzero(cut).flatten().tolist():
            lo, hi = self.cutout_side
            side = max(1, round((lo + (hi - lo) * float(sides[i])) * min(h, w)))
            top = int(float(corners[i, 0]) * (h - side + 1))
            left = int(float(corners[i, 1]) * (w - side + 1))
            keep[i, :, top:top + side, left:left + side] = False
        x = torch.where(keep, x, mean.expand_as(x))
        return x.to(images.dtype), keep


def same_report(batch: dict) -> torch.Tensor:
    """``[B, B]`` bool: True where two samples of ``batch`` read the same report (equal word-piece ids, or equal
    token vectors and mask); every pair when the batch carries no report (a text-free network)."""
    n = batch["image"].shape[0]
    if "text_ids" in batch:
        parts = [batch["text_ids"]]
    elif "text" in batch:
        parts = [batch["text"], *([batch["text_mask"]] if "text_mask" in batch else [])]
    else:
        return torch.ones((n, n), dtype=torch.bool, device=batch["image"].device)
    key = torch.cat([t.reshape(n, -1).float() for t in parts], dim=1)
    return (key[:, None, :] == key[None, :, :]).all(dim=-1)


@dataclass(frozen=True)
class ReportCutMix:
    """Report-aware CutMix of the strong view: with probability ``prob`` an image gets a box of another image of
    the batch that reads the same report (chosen uniformly among them; an image without such a partner is left
    alone), in its image, its pseudo label and its kept pixels alike, so the student is taught at every pixel the
    teacher's label for the pixel it sees. Box: a fraction ``area`` of the image, aspect ratio (height / width)
    in ``aspect`` (log-uniform), clipped to the image."""

    prob: float = 1.0
    area: tuple[float, float] = (0.1, 0.4)
    aspect: tuple[float, float] = (0.5, 2.0)

    def __call__(self, images: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor, partners: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``images [U, C, H, W]``, ``probs`` and ``keep [U, 1, H, W]``, ``partners [U, U]`` bool (may i take
        from j) -> (images, probs, keep, source ``[U, 1, H, W]`` long: the index of the image each pixel comes
        from). Random numbers come from ``generator`` (CPU) only; the inputs are not modified."""
        n, _, h, w = images.shape
        draws = torch.rand((n, 6), generator=generator).tolist()  # apply, partner, area, aspect, top, left
        source = torch.arange(n).view(n, 1, 1, 1).repeat(1, 1, h, w)
        allowed = partners.bool().cpu() & ~torch.eye(n, dtype=torch.bool)
        for i, (apply, pick, area, aspect, top, left) in enumerate(draws):
            candidates = torch.nonzero(allowed[i]).flatten().tolist()
            if apply >= self.prob or not candidates:
                continue
            j = candidates[min(int(pick * len(candidates)), len(candidates) - 1)]
            fraction = self.area[0] + (self.area[1] - self.area[0]) * area
            ratio = math.exp(math.log(self.aspect[0]) + (math.log(self.aspect[1]) - math.log(self.aspect[0])) * aspect)
            box_h = min(h, max(1, round(math.sqrt(fraction * ratio) * h)))
            box_w = min(w, max(1, round(math.sqrt(fraction / ratio) * w)))
            y0, x0 = int(top * (h - box_h + 1)), int(left * (w - box_w + 1))
            source[i, :, y0:y0 + box_h, x0:x0 + box_w] = j
        source = source.to(images.device)

        def gather(t: torch.Tensor) -> torch.Tensor:
            # out[i, c, y, x] = t[source[i, 0, y, x], c, y, x]
            index = source.expand(n, t.shape[1], h, w)
            return torch.gather(t, 0, index)

        return gather(images), gather(probs), gather(keep), source


def _select(batch: dict, rows: torch.Tensor) -> dict:
    """The per-sample tensors of ``batch`` at the bool selector ``rows [B]`` (other entries are dropped)."""
    n = rows.shape[0]
    return {k: v[rows] for k, v in batch.items() if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n}


@contextmanager
def frozen_running_stats(module: nn.Module):
    """BatchNorm layers of ``module`` normalise with the batch's statistics (train mode) but keep their running
    statistics and batch count as they were."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


# ---------------------------------------------------------------------- the module
class MeanTeacherModule(SegmentationModule):
    """SegmentationModule plus an EMA teacher whose confident hard labels train the student on unlabelled images.

    ``semi.warmup_epochs`` epochs train on the labelled part of each batch only (the unlabelled part is not even
    forwarded), exactly the steps-matched supervised baseline; at the start of the next epoch the teacher becomes
    a copy of the student and the consistency term starts, its weight ramped up over ``semi.rampup_epochs``.
    Validation scores both networks once the teacher runs (``val_dice_teacher``, ``val_dice_student``);
    ``val_dice`` (best epoch, early stopping) and the saved weights are those of ``semi.eval_model``.
    """

    def __init__(self, model: nn.Module, config, text_embedding: nn.Module | None = None,
                 sampler: PairedSampler | None = None):
        super().__init__(model, config, text_embedding)
        self.semi = config.semi
        teacher = {"model": copy.deepcopy(model)}
        if text_embedding is not None:
            teacher["text_embedding"] = copy.deepcopy(text_embedding)
        self.teacher = nn.ModuleDict(teacher)  # in the state dict: saved in last.ckpt, restored on resume
        self.teacher.requires_grad_(False)
        if sampler is not None:  # the training order follows this module's epoch (right after a resume, too)
            sampler.epoch_source = lambda: self.current_epoch
        self.strong = StrongAugment()
        self.cutmix = ReportCutMix(prob=self.semi.cutmix) if self.semi.cutmix > 0 else None
        self.pseudo_dice = MeanMetric()  # teacher's hard labels vs the hidden masks
        self.unlabelled_pred_dice = MeanMetric()  # the student's prediction on the strong view vs the hidden masks
        self.unlabelled_loss_mean = MeanMetric()  # the consistency term before its weight
        self.confident_fraction = MeanMetric()  # share of kept pixels the teacher is confident about
        self.val_dice_of = nn.ModuleDict({"teacher": MeanMetric(), "student": MeanMetric()})
        self._ramp = float("nan")
        self._ema_step = -1

    # ------------------------------------------------------------------ teacher
    def teacher_active(self) -> bool:
        return self.current_epoch >= self.semi.warmup_epochs

    def teacher_logits(self, batch: dict) -> torch.Tensor:
        """The teacher's logits, always in eval mode: deterministic labels, running BatchNorm statistics, no
        dropout. (Switched for the call only: a module left in eval mode makes Lightning warn at every fit.)"""
        model = self.teacher["model"]
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            if self.text_embedding is not None and "text_ids" in batch:
                ids = batch["text_ids"]
                return model(batch["image"], self.teacher["text_embedding"](ids), ids != 0)
            return model(batch["image"], batch.get("text"), batch.get("text_mask"))
        finally:
            self.teacher.train(was_training)

    def _copy_student_to_teacher(self) -> None:
        self.teacher["model"].load_state_dict(self.model.state_dict())
        if self.text_embedding is not None:
            self.teacher["text_embedding"].load_state_dict(self.text_embedding.state_dict())

    def weights_to_save(self) -> tuple[nn.Module, nn.Module | None]:
        if self.semi.eval_model == "teacher" and self.teacher_active():
            return self.teacher["model"], self.teacher["text_embedding"] if self.text_embedding is not None else None
        return self.model, self.text_embedding

    def on_train_start(self) -> None:
        self._ema_step = self.global_step  # the EMA follows optimizer steps taken from here on

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.current_epoch == self.semi.warmup_epochs:
            # Starts where the student is, as EPI's P_0 is the warm-up model's prediction: an average that
            # included the warm-up's early weights would trail far behind.
            self._copy_student_to_teacher()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.teacher_active() or self.global_step == self._ema_step:
            return  # warm-up, or a batch without an optimizer step (nothing to learn from)
        self._ema_step = self.global_step
        decay = float(self.semi.ema_decay)
        ema_update(self.teacher["model"], self.model, decay)
        if self.text_embedding is not None:
            ema_update(self.teacher["text_embedding"], self.text_embedding, decay)

    def consistency_ramp(self, batch_idx: int) -> float:
        batches = self.trainer.num_training_batches if self._trainer is not None else math.inf
        fraction = batch_idx / batches if math.isfinite(batches) and batches > 0 else 0.0
        return sigmoid_rampup(self.current_epoch - self.semi.warmup_epochs + fraction, self.semi.rampup_epochs)

    def _generator(self) -> torch.Generator:
        """Seeded by (trainer seed, optimizer step, rank): exact on resume, different on every DDP rank."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        seed = np.random.SeedSequence([self.config.trainer.seed, self.global_step, rank]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int):
        has_mask = batch["has_mask"].bool()
        if not self.teacher_active():  # warm-up: the labelled part only, as the steps-matched baseline
            if not bool(has_mask.any()):
                return None
            return super().training_step(_select(batch, has_mask), batch_idx)
        unlabelled = ~has_mask
        if not bool(unlabelled.any()):
            return super().training_step(batch, batch_idx)
        weak = _select(batch, unlabelled)
        with torch.no_grad():
            probs = torch.sigmoid(self.teacher_logits(weak).float())  # [U, 1, H, W], fresh every step
        generator = self._generator()
        strong, keep = self.strong(weak["image"], generator)
        targets, source = probs, None
        if self.cutmix is not None:  # drawn after the strong view: runs without CutMix keep their random numbers
            strong, targets, keep, source = self.cutmix(strong, probs, keep, same_report(weak), generator)
        terms, aux, n_labelled, n_unlabelled = [], [], int(has_mask.sum()), int(unlabelled.sum())
        if n_labelled:
            # The labelled images in a pass of their own: the steps-matched baseline's pass, BatchNorm statistics
            # included.
            labelled = _select(batch, has_mask)
            logits, aux_loss = self._logits_and_aux_loss(labelled)
            terms.append(self.supervised_loss(logits, labelled["mask"]))
            aux += [] if aux_loss is None else [aux_loss.float() * n_labelled]
        # The strong view normalises with its own batch statistics but leaves the running ones (what validation
        # and the teacher normalise with) to the labelled images: in one shared pass the jittered, cut-out images
        # skewed them, and the student's eval-mode Dice on the synthetic set swung between 0.05 and 0.45 from one
        # epoch to the next.
        with frozen_running_stats(self):
            student, aux_loss = self._logits_and_aux_loss({**weak, "image": strong})
        aux += [] if aux_loss is None else [aux_loss.float() * n_unlabelled]
        if aux:  # the report prior learns from every sample's report, weighted as in one pass
            terms.append(torch.stack(aux).sum() / (n_labelled + n_unlabelled))
        loss, used = consistency_loss(student, targets, self.semi.confidence, keep, self.config.loss.dice_weight,
                                      self.config.loss.bce_weight)
        self._log_quality(weak, probs, student, source)
        self.unlabelled_loss_mean.update(loss.detach(), weight=n_unlabelled)
        self.confident_fraction.update(used.detach())
        self._ramp = self.consistency_ramp(batch_idx)
        weight = self.semi.consistency_weight * self._ramp
        if weight > 0:
            terms.append(weight * loss)
        return self.finish_step(terms, n_labelled + n_unlabelled, batch_idx)

    def _log_quality(self, weak: dict, probs: torch.Tensor, student: torch.Tensor,
                     source: torch.Tensor | None = None) -> None:
        """The teacher's labels of the weak view, and the student's answer on the strong view (mixed, when CutMix
        made it, so measured against the hidden masks mixed the same way), against the hidden masks."""
        if "hidden_mask" not in weak:
            return
        known = weak["hidden_has_mask"].bool()  # hidden masks: measured, never trained on
        if bool(known.any()):
            hidden = weak["hidden_mask"] > 0.5
            self.pseudo_dice.update(batch_dice_iou(probs[known] >= 0.5, hidden[known])[0].float())
            if source is not None:
                hidden = torch.gather(hidden, 0, source)
                known = known & known[source.flatten(1)].all(dim=1)  # every image its pixels came from
            if bool(known.any()):
                own = torch.sigmoid(student.detach()[known].float()) >= 0.5
                self.unlabelled_pred_dice.update(batch_dice_iou(own, hidden[known])[0].float())

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        has_mask = batch["has_mask"].bool()
        if not bool(has_mask.any()):
            return
        mask = batch["mask"][has_mask]
        outputs = {"student": self._logits(batch)[has_mask]}
        if self.teacher_active():
            outputs["teacher"] = self.teacher_logits(batch)[has_mask]
        chosen = outputs.get(self.semi.eval_model, outputs["student"])
        self.val_loss.update(self.supervised_loss(chosen, mask).detach(), weight=chosen.shape[0])
        dice, iou = batch_dice_iou(torch.sigmoid(chosen.float()) >= 0.5, mask > 0.5)
        self.val_dice.update(dice.float())
        self.val_iou.update(iou.float())
        for name, logits in outputs.items():
            self.val_dice_of[name].update(batch_dice_iou(torch.sigmoid(logits.float()) >= 0.5, mask > 0.5)[0].float())

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        for name, metric in self.val_dice_of.items():
            value = float(metric.compute()) if metric.update_count else float("nan")
            metric.reset()
            self.val_results[f"val_dice_{name}"] = value

    # ------------------------------------------------------------------ epoch summary
    def train_epoch_results(self) -> dict[str, float]:
        results = super().train_epoch_results()
        for name, metric in (("pseudo_dice", self.pseudo_dice), ("unlabelled_pred_dice", self.unlabelled_pred_dice),
                             ("unlabelled_loss", self.unlabelled_loss_mean),
                             ("confident_fraction", self.confident_fraction)):
            results[name] = float(metric.compute()) if metric.update_count else float("nan")
            metric.reset()
        results["consistency_ramp"] = self._ramp
        self._ramp = float("nan")
        return results

    # ------------------------------------------------------------------ checkpoint (exact resume)
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {"config": json.dumps(dataclasses.asdict(self.semi))}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A state without a teacher (a run branched from the labelled-only warm-up of an EPI run,
        lvit.train.semi.branch) gets the student's weights as its teacher, which is replaced by a copy of the
        student at the warm-up's end anyway; past the warm-up a missing teacher is an error."""
        weights = checkpoint.get("state_dict", {})
        wanted = [k for k in self.state_dict() if k.startswith("teacher.")]
        missing = [k for k in wanted if k not in weights]
        if not missing:
            return
        resumes_at = int(checkpoint.get("epoch", -1)) + 1
        if resumes_at > self.semi.warmup_epochs:
            raise CheckpointError(f"the checkpoint holds no mean teacher and continues at epoch {resumes_at + 1}, "
                                  f"after the warm-up of {self.semi.warmup_epochs} epochs")
        for key in missing:
            weights[key] = weights[key[len("teacher."):]].clone()


__all__ = ["CHECKPOINT_KEY", "MeanTeacherModule", "ReportCutMix", "StrongAugment", "consistency_loss", "ema_update",
           "same_report", "sigmoid_rampup"]
