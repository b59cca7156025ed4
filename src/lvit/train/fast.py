"""The fast GPU training path: section ``fast`` of the config (preset ``qata-gpu``; docs/PERFORMANCE.md).

The runner adds :class:`FastPathPlugin` when ``fast.enabled``. It

* decodes both splits once into uint8 tensors on the training device (:class:`lvit.data.device.DeviceDataset`)
  and replaces the DataLoaders by :class:`~lvit.data.device.DeviceLoader` (augmentation on the device with the
  CPU pipeline's parameters; training batches ``drop_last`` so every step has the same shape);
* trains :class:`FastSegmentationModule`: channels_last weights and batches, ``Adam(fused=True)``,
  ``torch.compile`` of the network in place (``fast.compile``: ``default``, ``reduce-overhead`` = CUDA graphs;
  state-dict keys unchanged) and no host synchronisation per step: the loss, the divergence check and the
  validation Dice/IoU are accumulated in device tensors and read once per epoch;
* turns on ``cudnn.benchmark`` (with ``trainer.deterministic: false``, which the preset sets).

bf16 stays ``trainer.precision: bf16-mixed`` (Lightning's autocast). What it does not support: several devices
(the data lives on one), ``semi`` (its plug-in needs per-sample names and host-side pseudo labels).
A non-finite loss is noticed at the end of the epoch it happened in (not at its step): the run then stops with
:class:`~lvit.core.errors.TrainingDiverged` before that epoch's checkpoint is written, so the last good one is kept.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import ConfigError, TrainingDiverged
from ..core.metrics import batch_dice_iou
from .datamodule import TrainData
from .fastpath import compile_module, make_adam, to_channels_last
from .module import SegmentationModule
from .plugins import TrainingPlugin


def fast_device(config) -> torch.device:
    """The one device a fast run trains on: CUDA when the accelerator allows it and one is there, else CPU."""
    t = config.trainer
    if str(t.accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if str(t.accelerator) in ("gpu", "cuda"):
        raise ConfigError("fast.enabled with trainer.accelerator gpu: no CUDA device is available")
    return torch.device("cpu")


def _all_masked(dataset) -> bool:
    """Whether every record of a CPU dataset has a mask (unknown: False, so the module keeps the parent's
    per-sample selection instead of assuming masks that are not there)."""
    records = getattr(dataset, "records", None)
    return records is not None and all(getattr(r, "mask_path", None) is not None for r in records)


class DeviceTrainData(TrainData):
    """:class:`~lvit.train.datamodule.TrainData` whose datasets live on the device; ``loaders`` returns
    :class:`~lvit.data.device.DeviceLoader` objects (Lightning takes any sized iterable)."""

    def __init__(self, train, val, encoder, channels_last: bool):
        super().__init__(train, val, encoder)
        self.channels_last = channels_last

    def loaders(self, config):
        from ..data.device import DeviceAugmenter, DeviceLoader

        d = config.data
        aug = self.train.augment_config
        train = DeviceLoader(self.train, d.batch_size, shuffle=True, drop_last=True,
                             augmenter=DeviceAugmenter(aug) if aug else None, channels_last=self.channels_last)
        val = DeviceLoader(self.val, d.val_batch_size or d.batch_size, channels_last=self.channels_last)
        return train, val


class FastPathPlugin(TrainingPlugin):
    """Swaps the datasets for device-resident ones and supplies :class:`FastSegmentationModule`."""

    def __init__(self):
        self.labelled = (True, True)  # every training / validation sample has a mask

    def setup(self, config, data, data_root, run_dir, resume):
        config.validate("config")  # one device, no semi (TrainConfig.validate says why)
        device = fast_device(config)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
            torch.set_float32_matmul_precision("high")
        if not config.fast.device_data:  # the CPU DataLoaders stay; a record without a mask marks its split
            self.labelled = (_all_masked(data.train), _all_masked(data.val))
            return data
        from ..data.device import DeviceDataset

        workers = config.fast.decode_workers
        train = DeviceDataset.from_dataset(data.train, device, workers)
        val = DeviceDataset.from_dataset(data.val, device, workers)
        self.labelled = (train.all_labelled, val.all_labelled)
        return DeviceTrainData(train, val, data.encoder, config.fast.channels_last)

    def make_module(self, model, config, text_embedding=None):
        return FastSegmentationModule(model, config, text_embedding, all_labelled=self.labelled)


class FastSegmentationModule(SegmentationModule):
    """:class:`~lvit.train.module.SegmentationModule` without a host synchronisation per step (see module doc).

    ``all_labelled``: (train, val) every sample has a mask, so no boolean indexing (a sync) is needed; where
    not, those steps fall back to the parent's code."""

    def __init__(self, model, config, text_embedding=None, all_labelled: tuple[bool, bool] = (True, True)):
        super().__init__(model, config, text_embedding)
        self.fast = config.fast
        self.all_labelled = tuple(all_labelled)
        # [loss * n, n, non-finite steps] and [loss * n, n, dice sum, iou sum, images]; not saved in checkpoints.
        self.register_buffer("_train_acc", torch.zeros(3, dtype=torch.float64), persistent=False)
        self.register_buffer("_val_acc", torch.zeros(5, dtype=torch.float64), persistent=False)
        self._prepared = False

    def configure_model(self) -> None:
        """Once, before the optimizer is made: NHWC weights and the compiled forward (in place)."""
        if self._prepared:
            return
        self._prepared = True
        if self.fast.channels_last:
            to_channels_last(self.model)
            if self.ema is not None:  # the average's updates then read and write one memory layout
                to_channels_last(self.ema["model"])
        compile_module(self.model, self.fast.compile, self.fast.compile_backend)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The parent's optimizer with ``fused=True`` when ``fast.fused_optimizer``."""
        o = self.config.optim
        return make_adam(params, o.lr, weight_decay=o.weight_decay, decoupled=o.name == "adamw",
                         fused=self.fast.fused_optimizer)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._train_acc.zero_()

    def training_step(self, batch: dict, batch_idx: int):
        if not self.all_labelled[0]:
            loss = super().training_step(batch, batch_idx)
        else:
            logits = self._logits(batch)
            loss = self.supervised_loss(logits, batch["mask"]).float()
        if loss is None:
            return None
        n = batch["image"].shape[0]
        detached = loss.detach().double()
        one = torch.ones_like(detached)  # a fill kernel: a tensor from a Python number would be a host copy
        self._train_acc += torch.stack([detached * n, one * n, (~torch.isfinite(detached)).double()])
        return loss

    def _check_finite(self) -> None:
        bad = int(self._train_acc[2].item())
        if bad:
            raise TrainingDiverged(
                f"loss became non-finite in {bad} step(s) of epoch {self.current_epoch}; training stopped, the last "
                "good checkpoint is kept (try a lower optim.lr, optim.grad_clip or 32-true precision)")

    def train_epoch_results(self) -> dict[str, float]:
        self._check_finite()  # before the run callback writes this epoch's weights
        loss_sum, n, _ = self._train_acc.tolist()
        return {"train_loss": loss_sum / n if n else math.nan, **self.val_results, "lr": self._epoch_lr}

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        if self.trainer is not None and not self.trainer.sanity_checking:
            self._check_finite()  # do not validate a diverged network
        self._val_acc.zero_()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self.all_labelled[1]:
            return super().validation_step(batch, batch_idx)
        logits = self._logits(batch)
        mask = batch["mask"]
        n = logits.shape[0]
        loss = self.supervised_loss(logits, mask).detach().double()
        dice, iou = batch_dice_iou(torch.sigmoid(logits.float()) >= 0.5, mask > 0.5)
        count = torch.ones_like(loss) * n
        self._val_acc += torch.stack([loss * n, count, dice.sum(), iou.sum(), count])

    def on_validation_epoch_end(self) -> None:
        if not self.all_labelled[1]:
            return super().on_validation_epoch_end()
        loss_sum, n, dice_sum, iou_sum, images = self._val_acc.tolist()
        self.val_results = {"val_loss": loss_sum / n if n else math.nan,
                            "val_dice": dice_sum / images if images else math.nan,
                            "val_iou": iou_sum / images if images else math.nan}
        if self.trainer is not None and not self.trainer.sanity_checking:
            for name, value in self.val_results.items():
                self.log(name, value, prog_bar=name == "val_dice", sync_dist=False)
