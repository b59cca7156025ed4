"""The Lightning module: one network, the official supervised loss, Dice/IoU validation, Adam + cosine restarts.

Extension point for semi-supervised training: :meth:`SegmentationModule.unlabelled_loss` receives the batch,
the logits and a boolean selector of the samples without masks (``batch["has_mask"]`` False) and returns an
extra loss term (or None). The supervised loss only ever sees the labelled samples. ``batch["index"]`` is the
dataset index of each sample (for per-image state such as the EPI pseudo-label bank).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from ..core.errors import CheckpointError, TrainingDiverged
from ..core.metrics import batch_dice_iou
from .config import TrainConfig
from .ema import ema_decay_at, ema_update, swap_weights
from .losses import DiceBCELoss, distillation_loss


class SegmentationModule(pl.LightningModule):
    """Wraps a segmentation network (LViT, LViT-T or U-Net) for training.

    Batches are dicts as produced by :class:`lvit.data.SegmentationDataset`: ``image [B, C, H, W]``,
    ``mask [B, 1, H, W]``, ``text [B, L, D]``, ``text_mask [B, L]``, ``has_mask [B]``, ``index [B]``.
    For the trainable ("learned") text backend batches carry ``text_ids [B, L]`` instead of ``text`` and
    ``text_embedding`` (trained with the network) maps them to ``[B, L, D]``.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, text_embedding: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.text_embedding = text_embedding
        self.config = config
        self.loss_fn = DiceBCELoss(config.loss.dice_weight, config.loss.bce_weight)
        # Epoch aggregates; torchmetrics syncs them across DDP processes on compute().
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.val_dice = MeanMetric()  # mean over images of per-image Dice (threshold 0.5)
        self.val_iou = MeanMetric()
        self.val_results: dict[str, float] = {}
        self._epoch_lr = math.nan
        self.distill_teacher: nn.Module | None = None
        # optim.ema_decay: an average of the network (and the learned text embedding), validated and saved in its
        # place (lvit.train.ema). A child module, so last.ckpt carries it and a resumed run continues it exactly.
        self.ema: nn.ModuleDict | None = None
        self._ema_step = -1
        self._average_swapped_in = False
        if config.optim.ema_decay:
            average = {"model": copy.deepcopy(model)}
            if text_embedding is not None:
                average["text_embedding"] = copy.deepcopy(text_embedding)
            self.ema = nn.ModuleDict(average).requires_grad_(False)

    def set_distill_teacher(self, teacher: nn.Module) -> None:
        """Distil from ``teacher`` (a frozen network reading the same inputs) instead of from this network. Kept out
        of the module's children so that it is neither trained, nor moved by the optimizer, nor written into the
        run's weights and checkpoints: the run's config names it (``loss.distill_teacher``)."""
        teacher.eval().requires_grad_(False)
        self.__dict__["distill_teacher"] = teacher  # bypasses nn.Module's registration of child modules

    # ------------------------------------------------------------------ forward
    def forward(self, image: torch.Tensor, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(image, text, text_mask)  # logits [B, 1, H, W]

    def _inputs(self, batch: dict) -> tuple:
        if self.text_embedding is not None and "text_ids" in batch:
            ids = batch["text_ids"]  # [B, L] int64, 0 = padding
            return batch["image"], self.text_embedding(ids), ids != 0
        return batch["image"], batch.get("text"), batch.get("text_mask")

    def _logits(self, batch: dict) -> torch.Tensor:
        return self(*self._inputs(batch))

    def _logits_and_aux_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training logits and the weighted sum of the network's auxiliary losses (None when it has none): the
        report prior's, and with ``loss.distill_weight`` the distillation of the report's answer into the
        no-report answer of the samples whose report was dropped (from epoch ``loss.distill_start_epoch`` on; the
        module draws the dropped rows in every epoch, so the draw does not depend on the start)."""
        forward_with_aux = getattr(self.model, "forward_with_aux", None)
        if forward_with_aux is None:
            return self._logits(batch), None
        image, text, text_mask = self._inputs(batch)
        dropped = None
        if self.config.loss.distill_weight and text is not None:  # the module draws the dropped rows itself
            dropped = torch.rand(image.shape[0], device=image.device) < float(self.model.config.report_dropout)
        logits, aux = forward_with_aux(image, text, text_mask, dropped)
        weights = {"report_prior": self.config.loss.report_prior_weight}
        terms = [weights[name] * value.float() for name, value in aux.items() if weights[name]]
        distilling = self.current_epoch >= self.config.loss.distill_start_epoch
        if dropped is not None and bool(dropped.any()) and distilling:
            teacher = self.answer_with_report(image[dropped], text[dropped],
                                              None if text_mask is None else text_mask[dropped])
            terms.append(self.config.loss.distill_weight * distillation_loss(logits[dropped], teacher))
        return logits, (torch.stack(terms).sum() if terms else None)

    @torch.no_grad()
    def answer_with_report(self, image: torch.Tensor, text: torch.Tensor,
                           text_mask: torch.Tensor | None) -> torch.Tensor:
        """The network's logits with the report, as it answers at test time (eval mode: running BatchNorm
        statistics, no dropout; no gradient): the target its no-report answer is distilled towards. With a
        distillation teacher (:meth:`set_distill_teacher`), that network's logits instead."""
        teacher = self.distill_teacher
        if teacher is not None:  # float32 whatever the student computes in (bf16-true, 64-true)
            dtype = next(teacher.parameters()).dtype
            return teacher.to(image.device)(image.to(dtype), text.to(dtype), text_mask).float()
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model(image, text, text_mask).float()
        finally:
            self.model.train(was_training)

    def weights_to_save(self) -> tuple[nn.Module, nn.Module | None]:
        """(network, learned text embedding or None) written as the run's last/best weights: the ones validated."""
        if self.ema is not None:
            return self.ema["model"], self.ema["text_embedding"] if self.text_embedding is not None else None
        return self.model, self.text_embedding

    # ------------------------------------------------------------------ weight average (optim.ema_decay)
    def _swap_average(self) -> None:
        swap_weights(self.model, self.ema["model"])
        if self.text_embedding is not None:
            swap_weights(self.text_embedding, self.ema["text_embedding"])
        self._average_swapped_in = not self._average_swapped_in

    def on_train_start(self) -> None:
        self._ema_step = self.global_step  # the average follows the optimizer steps taken from here on

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is None or self.global_step == self._ema_step:
            return  # no average, or a batch without an optimizer step (nothing to learn from)
        self._ema_step = self.global_step
        decay = ema_decay_at(self.global_step, self.config.optim.ema_decay)
        ema_update(self.ema["model"], self.model, decay)
        if self.text_embedding is not None:
            ema_update(self.ema["text_embedding"], self.text_embedding, decay)

    def on_validation_start(self) -> None:
        # Validation scores the average: its values are swapped into the network for the pass (every validation
        # step of every subclass then uses them) and swapped back at the end, before the optimizer sees them.
        if self.ema is not None:
            self._swap_average()

    def on_validation_end(self) -> None:
        if self.ema is not None:
            self._swap_average()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint taken during validation (another callback's validation hook, a cluster's pre-emption signal)
        # would hold the average as the network and the network as the average: written back the right way round.
        if self._average_swapped_in:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("ema.")]:
                own = key[len("ema."):]
                state[key], state[own] = state[own], state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is None:
            return
        missing = [k for k in self.state_dict() if k.startswith("ema.") and k not in checkpoint.get("state_dict", {})]
        if missing:
            raise CheckpointError("the checkpoint holds no weight average: it was written without optim.ema_decay, "
                                  "so a run with it cannot continue from it")

    # ------------------------------------------------------------------ losses
    def supervised_loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Official loss on labelled samples: logits, mask ``[N, 1, H, W]``."""
        return self.loss_fn(logits, mask)

    def unlabelled_loss(self, batch: dict, logits: torch.Tensor, unlabelled: torch.Tensor) -> torch.Tensor | None:
        """Hook for semi-supervised training; ``unlabelled`` is a bool ``[B]`` selector. Default: no term."""
        return None

    def on_train_epoch_start(self) -> None:
        # The learning rate this epoch trains with (the scheduler steps before the epoch-end callbacks run).
        self._epoch_lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else math.nan

    def _moved_reports(self, batch: dict) -> dict:
        """The batch with its reports' word pieces reordered by ``text.token_shuffle`` and moved by
        ``text.token_shift`` (lvit.train.token_shift)."""
        from .token_shift import shift_tokens, shuffle_tokens

        shift, shuffle = int(self.config.text.token_shift), float(self.config.text.token_shuffle)
        if "text_ids" in batch:
            ids = shuffle_tokens(batch["text_ids"], batch["text_ids"] != 0, shuffle)
            ids, _ = shift_tokens(ids, ids != 0, shift)
            return {**batch, "text_ids": ids}
        if batch.get("text") is None:
            return batch
        mask = batch.get("text_mask")
        words = mask if mask is not None else batch["text"].abs().sum(-1) > 0
        text, moved = shift_tokens(shuffle_tokens(batch["text"], words, shuffle), words, shift)
        return {**batch, "text": text, **({"text_mask": moved} if mask is not None else {})}

    def training_step(self, batch: dict, batch_idx: int):
        if self.config.text.token_shift or self.config.text.token_shuffle:
            batch = self._moved_reports(batch)
        logits, aux_loss = self._logits_and_aux_loss(batch)
        has_mask = batch["has_mask"].bool()
        terms = [] if aux_loss is None else [aux_loss]  # the report prior learns from every sample's report
        if bool(has_mask.any()):
            terms.append(self.supervised_loss(logits[has_mask], batch["mask"][has_mask]))
        extra = self.unlabelled_loss(batch, logits, ~has_mask) if bool((~has_mask).any()) else None
        if extra is not None:
            terms.append(extra)
        return self.finish_step(terms, logits.shape[0], batch_idx)

    def finish_step(self, terms: list[torch.Tensor], n: int, batch_idx: int):
        """The step's loss (the sum of ``terms``) checked, recorded and logged over ``n`` samples; None (Lightning
        skips the step) without terms."""
        if not terms:
            return None  # nothing to learn from in this batch: Lightning skips the step
        loss = torch.stack([t.float() for t in terms]).sum()
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss.item()} at epoch {self.current_epoch} (batch {batch_idx}); training stopped, "
                "the last good checkpoint is kept (try a lower optim.lr, optim.grad_clip or 32-true precision)"
            )
        self.train_loss.update(loss.detach(), weight=n)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        return loss

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self._logits(batch)
        has_mask = batch["has_mask"].bool()
        if not bool(has_mask.any()):
            return
        logits, mask = logits[has_mask], batch["mask"][has_mask]
        self.val_loss.update(self.supervised_loss(logits, mask).detach(), weight=logits.shape[0])
        pred = torch.sigmoid(logits.float()) >= 0.5  # [N, 1, H, W]
        dice, iou = batch_dice_iou(pred, mask > 0.5)  # [N] each
        self.val_dice.update(dice.float())
        self.val_iou.update(iou.float())

    def on_validation_epoch_end(self) -> None:
        results = {}
        for name, metric in (("val_loss", self.val_loss), ("val_dice", self.val_dice), ("val_iou", self.val_iou)):
            value = float(metric.compute()) if metric.update_count else float("nan")
            metric.reset()
            results[name] = value
        self.val_results = results
        if self.trainer is not None and not self.trainer.sanity_checking:
            for name, value in results.items():
                self.log(name, value, prog_bar=name == "val_dice", sync_dist=False)

    def train_epoch_results(self) -> dict[str, float]:
        """Epoch summary (called by the run callback on every process at the end of each epoch)."""
        loss = float(self.train_loss.compute()) if self.train_loss.update_count else float("nan")
        self.train_loss.reset()
        return {"train_loss": loss, **self.val_results, "lr": self._epoch_lr}

    # ------------------------------------------------------------------ optimisation
    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """Adam, or AdamW with ``optim.name: adamw`` (the fast path asks for fused kernels)."""
        from .fastpath import make_adam

        o = self.config.optim
        return make_adam(params, o.lr, weight_decay=o.weight_decay, decoupled=o.name == "adamw")

    def configure_optimizers(self):
        o = self.config.optim
        optimizer = self.make_optimizer([p for p in self.parameters() if p.requires_grad])
        if o.scheduler == "none":
            return optimizer
        # Stepped once per epoch (after validation), as the official train_model.py does.
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=o.t0, T_mult=o.t_mult, eta_min=self.config.effective_eta_min
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
