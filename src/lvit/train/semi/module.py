"""Semi-supervised training: the labelled subset, EPI pseudo labels and the LV loss around SegmentationModule
(the mean-teacher recipe, ``semi.mode: mean-teacher``, lives in :mod:`.mean_teacher` and is set up here too).

``setup_semi`` turns a supervised :class:`~lvit.train.datamodule.TrainData` into a semi-supervised one (mask
hidden for the unlabelled images, split written to the run folder) and builds the pseudo-label bank and the
contrast labels; :class:`SemiSupervisedModule` plugs the unlabelled loss into the supervised module through its
``unlabelled_loss`` hook:

    labelled images:    Dice+BCE(pred, mask)                                  (the module's supervised loss)
    unlabelled images:  Dice+BCE(pred, P_t) + lv_weight * LV(pred, contrast)   (P_t: EPI, Eq. 8)

Unlabelled images are fed without augmentation: the bank holds each pseudo label in the image's own frame, and
a geometric augmentation would otherwise have to be inverted before the update.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate
from torchmetrics import MeanMetric

from ...core.errors import CheckpointError, ConfigError
from ...core.metrics import batch_dice_iou
from ..config import SemiConfig
from ..module import SegmentationModule
from ..plugins import TrainingPlugin
from .labelled_subset import (
    SUBSET_FILE,
    LabelledSubset,
    choose_fraction,
    choose_listed,
    write_subset,
)
from .lv_loss import ContrastLabelBank, default_contrast_folder, lv_loss
from .pseudo_labels import PseudoLabelBank, gather_updates
from .sampler import PairedSampler, WarmupSampler

BANK_FILE = "pseudo_labels.npy"  # scratch memmap of large banks; the checkpoint holds the durable copy
CHECKPOINT_KEY = "semi_supervised"


class SemiSupervisedDataset(Dataset):
    """Training samples with the masks of unlabelled images hidden.

    Labelled images come from ``augmented`` (the usual training dataset); unlabelled ones from ``plain`` (same
    records, no augmentation) with ``mask`` zeroed and ``has_mask`` False. Every item carries ``hidden_mask``
    ``[1, H, W]`` (the real mask, zeros where the file has none) and ``hidden_has_mask``, used only to log the
    pseudo labels' quality, never for training.
    """

    def __init__(self, augmented: Dataset, plain: Dataset, labelled: np.ndarray):
        if len(augmented) != len(plain) or len(plain) != len(labelled):
            raise ValueError("augmented, plain and labelled must cover the same records")
        self.augmented, self.plain = augmented, plain
        self.labelled = np.asarray(labelled, dtype=bool)
        self.records = getattr(plain, "records", None)

    def __len__(self) -> int:
        return len(self.plain)

    def __getitem__(self, index: int) -> dict:
        if self.labelled[index]:
            item = dict(self.augmented[index])
            item["hidden_mask"] = item["mask"]
            item["hidden_has_mask"] = bool(item["has_mask"])
            return item
        item = dict(self.plain[index])
        item["hidden_mask"] = item["mask"]
        item["hidden_has_mask"] = bool(item["has_mask"])
        item["mask"] = torch.zeros_like(item["mask"])
        item["has_mask"] = False
        return item


class SemiSupervisedModule(SegmentationModule):
    """SegmentationModule plus EPI pseudo labels and the LV loss for the samples without masks."""

    def __init__(
        self,
        model: nn.Module,
        config,
        semi: SemiConfig,
        bank: PseudoLabelBank,
        contrast_index: torch.Tensor | None = None,
        contrast_masks: torch.Tensor | None = None,
        text_embedding: nn.Module | None = None,
        sampler: WarmupSampler | None = None,
        unlabelled_source: tuple[Dataset, np.ndarray] | None = None,
    ):
        super().__init__(model, config, text_embedding)
        self.semi = semi
        self.bank = bank
        # (dataset without augmentation, its unlabelled rows): where P_0 is predicted from at the warm-up's end.
        self.unlabelled_source = unlabelled_source
        if sampler is not None:  # the training order follows this module's epoch (right after a resume, too)
            sampler.epoch_source = lambda: self.current_epoch
        # contrast_index [N]: dataset index -> row of contrast_masks [K, 1, H, W] (-1: labelled, none needed).
        self.contrast_index = contrast_index
        if contrast_masks is not None:
            self.register_buffer("contrast_masks", contrast_masks.float(), persistent=False)
        else:
            self.contrast_masks = None
        self.pseudo_dice = MeanMetric()  # Dice of thresholded P_t vs the hidden masks
        self.unlabelled_pred_dice = MeanMetric()  # Dice of the current prediction on unlabelled images
        self.unlabelled_loss_mean = MeanMetric()
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ P_0: the warm-up model's prediction
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.semi.mode != "none" and self.current_epoch == self.semi.warmup_epochs:
            self.initialise_bank()

    @torch.no_grad()
    def initialise_bank(self) -> None:
        """Set P_0 of every unlabelled image not in the bank yet to the model's prediction in eval mode.

        Why not the first training-step prediction: that one is made in train mode (dropout, batch statistics
        of mixed labelled/unlabelled batches) in the epoch right after the warm-up, which under the official
        warm-restart schedule runs at the top learning rate; on the synthetic set it scored Dice 0.56 where the
        warm-up model scored 0.87 on validation, and beta = 0.99 kept it there. Recorded as this epoch's update,
        so Eq. 8's averaging starts with the next epoch. Under DDP each rank predicts a share and all apply the
        gathered updates in the same order: the banks stay identical.
        """
        if self.unlabelled_source is None:
            return
        dataset, rows = self.unlabelled_source
        rows = np.asarray(rows)
        rows = rows[~self.bank.initialised(rows).numpy()] if rows.size else rows
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        mine = rows[rank::world]
        was_training = self.training
        self.eval()
        indices, probs = [], []
        size = self.config.data.val_batch_size or self.config.data.batch_size
        for start in range(0, len(mine), size):
            batch = default_collate([dataset[int(i)] for i in mine[start : start + size]])
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            probs.append(torch.sigmoid(self._logits(batch).float()))  # [b, 1, H, W]
            indices.append(torch.as_tensor(mine[start : start + size], dtype=torch.long))
        self.train(was_training)
        h, w = self.bank.size
        index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
        prob = torch.cat(probs) if probs else torch.zeros(0, 1, h, w, device=self.device)
        index, prob = gather_updates(index.to(prob.device), prob, self.all_gather, world)
        if index.numel():
            self.bank.update(index.cpu(), prob, self.current_epoch)

    # ------------------------------------------------------------------ the unlabelled term
    def pseudo_labels_active(self) -> bool:
        return self.semi.mode != "none" and self.current_epoch >= self.semi.warmup_epochs

    def unlabelled_loss(self, batch: dict, logits: torch.Tensor, unlabelled: torch.Tensor) -> torch.Tensor | None:
        probs = torch.sigmoid(logits[unlabelled].float())  # [U, 1, H, W]
        self._log_quality(batch, unlabelled, probs)
        if not self.pseudo_labels_active():
            return None
        index = batch["index"][unlabelled].long().cpu()  # [U]
        # P_t of Eq. 8 (includes this prediction with weight 1 - beta); the bank itself is updated after the
        # step from every rank's predictions (on_train_batch_end).
        target = self.bank.preview(index, probs.detach(), self.current_epoch)  # [U, 1, H, W]
        self._pending.append((index, probs.detach()))
        hidden = batch["hidden_mask"][unlabelled]
        known = batch["hidden_has_mask"][unlabelled].bool()
        if bool(known.any()):
            dice, _ = batch_dice_iou(target[known] > 0.5, hidden[known] > 0.5)
            self.pseudo_dice.update(dice.float())
        if self.semi.pseudo_threshold is not None:
            target = (target > self.semi.pseudo_threshold).float()
        loss = self.loss_fn(logits[unlabelled], target)
        if self.semi.uses_lv and self.semi.lv_weight > 0:
            rows = self.contrast_index[index].to(self.contrast_masks.device)  # [U]
            loss = loss + self.semi.lv_weight * lv_loss(probs, self.contrast_masks[rows])
        self.unlabelled_loss_mean.update(loss.detach(), weight=int(unlabelled.sum()))
        return loss

    def _log_quality(self, batch: dict, unlabelled: torch.Tensor, probs: torch.Tensor) -> None:
        if "hidden_mask" not in batch:
            return
        known = batch["hidden_has_mask"][unlabelled].bool()
        if bool(known.any()):
            dice, _ = batch_dice_iou(probs[known] >= 0.5, batch["hidden_mask"][unlabelled][known] > 0.5)
            self.unlabelled_pred_dice.update(dice.float())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # the weight average (optim.ema_decay)
        if not self.pseudo_labels_active():
            self._pending.clear()
            return
        h, w = self.bank.size
        if self._pending:
            index = torch.cat([i for i, _ in self._pending])
            probs = torch.cat([p for _, p in self._pending])
        else:  # this rank saw only labelled images: it still takes part in the gather
            index = torch.zeros(0, dtype=torch.long)
            probs = torch.zeros(0, 1, h, w, device=self.device)
        self._pending.clear()
        world = self.trainer.world_size if self._trainer is not None else 1
        index, probs = gather_updates(index.to(probs.device), probs, self.all_gather, world)
        if index.numel():
            self.bank.update(index.cpu(), probs, self.current_epoch)

    # ------------------------------------------------------------------ epoch summary
    def train_epoch_results(self) -> dict[str, float]:
        results = super().train_epoch_results()
        for name, metric in (("pseudo_dice", self.pseudo_dice), ("unlabelled_pred_dice", self.unlabelled_pred_dice),
                             ("unlabelled_loss", self.unlabelled_loss_mean)):
            results[name] = float(metric.compute()) if metric.update_count else float("nan")
            metric.reset()
        return results

    # ------------------------------------------------------------------ checkpoint (exact resume)
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY] = {"bank": self.bank.state_dict(),
                                      "config": json.dumps(dataclasses.asdict(self.semi))}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise CheckpointError("the checkpoint holds no pseudo-label bank (it is not from a semi-supervised run)")
        self.bank.load_state_dict(state["bank"])
        # The run's config decides beta, not the state it resumes: a run branched from another one after the
        # warm-up (lvit.train.semi.branch), or resumed with another beta, averages with its own.
        self.bank.beta = float(self.semi.beta)


# ---------------------------------------------------------------------- set-up
@dataclass
class SemiSetup:
    data: Any  # TrainData with the wrapped training dataset
    subset: LabelledSubset
    bank: PseudoLabelBank
    contrast_index: torch.Tensor | None
    contrast_masks: torch.Tensor | None
    sampler: WarmupSampler | PairedSampler | None = None
    unlabelled_source: tuple[Dataset, np.ndarray] | None = None  # (plain dataset, unlabelled rows) for P_0

    def module(self, model: nn.Module, config, text_embedding: nn.Module | None = None):
        if config.semi.mode == "none":
            return SegmentationModule(model, config, text_embedding)
        if config.semi.mode == "mean-teacher":
            from .mean_teacher import MeanTeacherModule

            return MeanTeacherModule(model, config, text_embedding, self.sampler)
        return SemiSupervisedModule(model, config, config.semi, self.bank, self.contrast_index, self.contrast_masks,
                                    text_embedding, self.sampler, self.unlabelled_source)


def setup_semi(config, data, data_root: str | Path | None, run_dir: str | Path, resume: bool = False) -> SemiSetup:
    """Hide the unlabelled masks of ``data.train``, write the split, build bank + contrast labels, as
    ``config.semi`` says (the settings themselves are saved with the run's config.yaml).

    On ``resume`` the split is read back from ``run_dir/labelled_subset.json`` (never re-drawn).
    """
    from ..datamodule import make_dataset, text_cache_dir

    semi = config.semi
    run_dir = Path(run_dir)
    records = list(data.train.records)
    names = [r.name for r in records]
    subset_file = run_dir / SUBSET_FILE
    if resume and subset_file.is_file():
        subset = choose_listed(names, subset_file)
    elif semi.labeled_list is not None:
        subset = choose_listed(names, semi.labeled_list)
    else:
        seed = config.trainer.seed if semi.seed is None else semi.seed
        subset = choose_fraction(names, semi.labeled_fraction if semi.labeled_fraction is not None else 1.0, seed)
    if not resume:
        write_subset(run_dir, subset)
    labelled = subset.mask_for(names)

    root = data_root if data_root is not None else config.data.root
    cache = text_cache_dir(config, root) if (data.encoder is not None and root is not None) else None
    size = config.model.image_size
    if semi.mode == "none":
        # Supervised on the labelled subset only: the unlabelled images are left out of training altogether.
        kept = [records[i] for i in np.flatnonzero(labelled)]
        train = make_dataset(kept, config, data.encoder, cache, augment=config.data.augment)
        bank = PseudoLabelBank(1, (1, 1), semi.beta, "memory")  # unused
        return SemiSetup(dataclasses.replace(data, train=train), subset, bank, None, None)
    plain = make_dataset(records, config, data.encoder, cache, augment=False)
    wrapped = SemiSupervisedDataset(data.train, plain, labelled)
    if semi.mode == "mean-teacher":
        # No bank: the teacher labels each unlabelled image afresh at every step.
        batch = config.data.batch_size
        paired = PairedSampler(labelled, batch, semi.unlabelled_batch or batch, config.trainer.seed)
        new_data = dataclasses.replace(data, train=wrapped, train_sampler=paired,
                                       train_batch_size=paired.loader_batch_size)
        return SemiSetup(new_data, subset, PseudoLabelBank(1, (1, 1), semi.beta, "memory"), None, None, paired)
    sampler = WarmupSampler(labelled, semi.warmup_epochs, config.trainer.seed)
    new_data = dataclasses.replace(data, train=wrapped, train_sampler=sampler)

    bank = PseudoLabelBank(len(records), (size, size), semi.beta, semi.storage, run_dir / BANK_FILE)
    contrast_index = contrast_masks = None
    if semi.uses_lv:
        contrast = _contrast_bank(semi, plain, labelled, size)
        # Through the run's text cache like the image reports (a dataset's reports are embedded once; a machine
        # without the encoder package can run from a filled cache).
        encoder = report_encoder(config, semi, text_cache_dir(config, root) if root is not None else None)
        unlabelled_rows = np.flatnonzero(~labelled)
        contrast_index = torch.full((len(records),), -1, dtype=torch.long)
        if unlabelled_rows.size:
            nearest = contrast.assign(encoder, [records[i].text for i in unlabelled_rows])
            contrast_index[torch.from_numpy(unlabelled_rows)] = nearest
        contrast_masks = contrast.masks
    return SemiSetup(new_data, subset, bank, contrast_index, contrast_masks, sampler,
                     (plain, np.flatnonzero(~labelled)))


class SemiSupervisedPlugin(TrainingPlugin):
    """Semi-supervised training as a :class:`~lvit.train.plugins.TrainingPlugin`; the runner adds it whenever
    ``config.semi`` asks for a labelled subset or pseudo labels."""

    def __init__(self):
        self._setup: SemiSetup | None = None

    def setup(self, config, data, data_root, run_dir, resume):
        self._setup = setup_semi(config, data, data_root, run_dir, resume)
        return self._setup.data

    def make_module(self, model, config, text_embedding=None):
        return self._setup.module(model, config, text_embedding)


def _contrast_bank(semi: SemiConfig, plain: Dataset, labelled: np.ndarray, size: int) -> ContrastLabelBank:
    if semi.lv_contrast == "templates":
        return ContrastLabelBank.from_folder(default_contrast_folder(), size)
    if semi.lv_contrast != "labelled":
        return ContrastLabelBank.from_folder(semi.lv_contrast, size)
    rows = [i for i in np.flatnonzero(labelled).tolist() if plain.records[i].mask_path is not None]
    if not rows:
        raise ConfigError("the LV loss needs labelled images with masks to build contrast labels from")
    masks = torch.stack([plain[i]["mask"] for i in rows])  # [K, 1, S, S]
    return ContrastLabelBank.from_labelled(masks, [plain.records[i].text for i in rows],
                                           [plain.records[i].name for i in rows])


def report_encoder(config, semi: SemiConfig, cache_dir: Path | None = None):
    """A frozen encoder for whole-report vectors: the run's (unless trainable) or MiniLM, with more tokens;
    cached in ``cache_dir`` when given."""
    from ...text import get_text_encoder
    from ...text.cache import CachedEncoder

    spec = semi.lv_encoder or (config.text.encoder if config.text.encoder != "learned" else "minilm")
    encoder = get_text_encoder(spec, semi.lv_max_tokens, min_words=0)
    return encoder if cache_dir is None else CachedEncoder(encoder, cache_dir)
