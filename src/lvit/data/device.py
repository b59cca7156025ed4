"""A dataset held on the training device: decoded once into uint8 tensors, batched and augmented there.

The fast GPU training path (``fast.device_data``; docs/PERFORMANCE.md) replaces the DataLoader of
:class:`~lvit.data.dataset.SegmentationDataset` with :class:`DeviceLoader`: no worker processes, no per-sample
Python, no host-to-device copy per step and no host synchronisation (the shuffle order and every random draw of
the augmentation are made on the device).

* :class:`DeviceDataset` decodes every record once through the dataset's own reader and preprocessing
  (``SegmentationDataset._load_resized``: channels, resize, mask binarisation) and keeps ``images [N, C, S, S]``
  uint8 (one channel when every image is grey and the model repeats it), ``masks [N, 1, S, S]`` uint8 {0, 1}
  and the report tensors. ``image / 255`` is exactly the CPU dataset's image when the files already have the
  model's size (QaTa-COV19 at 224); otherwise the resized image is rounded to uint8 (at most 0.5/255 off).
* :class:`DeviceAugmenter` is :class:`~lvit.data.transforms.Augmenter` (MONAI) for a whole batch in torch, with the
  same :class:`~lvit.data.transforms.AugmentConfig` and the same distributions: with probability ``affine_prob``
  a rotation U(+-rotate_deg), a scale 1 + U(+-scale) per axis and a translation U(+-translate x side) per axis,
  composed as MONAI's ``RandAffine`` (rotate @ translate @ scale on centred pixel coordinates; bilinear image,
  nearest mask, border padding); then, each with probability ``intensity_prob``, gamma contrast U(gamma) on the
  image's min..max, a shift U(+-shift) and Gaussian noise with a standard deviation U(0, noise_std) per element of
  every channel; clamp to [0, 1]; horizontal flip with ``hflip_prob`` (the report swapped). Given the same
  parameters the warp equals MONAI's ``Affine`` (tests/test_fast_path.py).
* :class:`DeviceLoader` iterates batches (dicts of tensors on the device, as the CPU loader's minus the strings):
  a permutation drawn on the device each epoch, ``drop_last`` for training (static shapes for CUDA graphs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from .transforms import AugmentConfig


class DeviceDataset:
    """Decoded images, masks and report tensors of a split, on one device (see the module doc)."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, *, in_channels: int, records: Sequence = (),
                 has_mask: torch.Tensor | None = None, text_emb: torch.Tensor | None = None,
                 text_mask: torch.Tensor | None = None, text_emb_flipped: torch.Tensor | None = None,
                 text_mask_flipped: torch.Tensor | None = None, text_ids: torch.Tensor | None = None,
                 text_ids_flipped: torch.Tensor | None = None, augment_config: AugmentConfig | None = None):
        if images.dtype != torch.uint8 or masks.dtype != torch.uint8:
            raise ValueError("images and masks must be uint8 tensors")
        n = images.shape[0]
        if masks.shape[0] != n or images.ndim != 4 or masks.ndim != 4 or masks.shape[1] != 1:
            raise ValueError(f"expected images [N, C, S, S] and masks [N, 1, S, S], got {tuple(images.shape)} "
                             f"and {tuple(masks.shape)}")
        device = images.device
        self.images, self.masks = images, masks.to(device)
        self.in_channels = int(in_channels)
        self.records = list(records)
        self.has_mask = (has_mask if has_mask is not None else torch.ones(n, dtype=torch.bool)).to(device)
        self.image_size = images.shape[-1]

        def put(t, dtype=None):
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        self.text_emb, self.text_mask = put(text_emb, torch.float32), put(text_mask, torch.bool)
        if self.text_emb is not None and self.text_mask is None:
            self.text_mask = torch.ones(self.text_emb.shape[:2], dtype=torch.bool, device=device)
        self.text_emb_flipped, self.text_mask_flipped = put(text_emb_flipped, torch.float32), put(text_mask_flipped,
                                                                                                    torch.bool)
        self.text_ids, self.text_ids_flipped = put(text_ids), put(text_ids_flipped)
        self.augment_config = augment_config

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def all_labelled(self) -> bool:
        return bool(self.has_mask.all())

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def from_dataset(cls, dataset, device: str | torch.device = "cpu", workers: int = 8) -> DeviceDataset:
        """Decode every record of a :class:`~lvit.data.dataset.SegmentationDataset` (threads: PIL and torch
        release the GIL) and move the result to ``device``."""
        n, s, c = len(dataset.records), dataset.image_size, dataset.in_channels

        def load(i):
            image, mask, _ = dataset._load_resized(dataset.records[i])
            u8 = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
            return u8, (mask if mask is not None else None)

        if workers > 1 and n > 1:
            # The pool is the parallelism: torch's own threads inside each worker's resize would multiply the
            # threads by the core count and fight over the cores (two processes side by side on 16 cores: 256).
            # The setting is process-wide: the fast path decodes its splits one after the other, nothing else runs.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    items = list(pool.map(load, range(n)))
            finally:
                torch.set_num_threads(threads)
        else:
            items = [load(i) for i in range(n)]
        # A grey image repeated into 3 channels is kept once (the augmentation's noise is drawn per channel later).
        grey = all(bool((u8[1:] == u8[:1]).all()) for u8, _ in items) if c > 1 else True
        images = torch.empty((n, 1 if grey else c, s, s), dtype=torch.uint8)
        masks = torch.zeros((n, 1, s, s), dtype=torch.uint8)
        has_mask = torch.zeros(n, dtype=torch.bool)
        for i, (u8, mask) in enumerate(items):
            images[i] = u8[:1] if grey else u8
            if mask is not None:
                masks[i], has_mask[i] = mask, True
        return cls(images.to(device), masks.to(device), in_channels=c, records=dataset.records, has_mask=has_mask,
                   text_emb=dataset.text_emb, text_mask=dataset.text_mask, text_emb_flipped=dataset.text_emb_flipped,
                   text_mask_flipped=dataset.text_mask_flipped, text_ids=dataset.text_ids,
                   text_ids_flipped=dataset.text_ids_flipped, augment_config=dataset.augment_config)

    def batch(self, index: torch.Tensor, augmenter: DeviceAugmenter | None = None,
              channels_last: bool = False) -> dict:
        """The batch of the samples ``index`` (a long tensor on the device): the CPU loader's keys except
        ``name`` and ``orig_size``."""
        image = self.images[index].float().div_(255.0)  # [B, C, S, S], exactly u8 / 255 as the CPU dataset
        mask = self.masks[index].float()
        flipped = torch.zeros(index.shape[0], dtype=torch.bool, device=image.device)
        if augmenter is not None:
            image, mask, flipped = augmenter(image, mask, self.in_channels)
        if image.shape[1] != self.in_channels:
            image = image.expand(-1, self.in_channels, -1, -1)
        image = image.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out = {"image": image, "mask": mask.contiguous(), "index": index, "has_mask": self.has_mask[index],
               "flipped": flipped}
        if self.text_emb is not None:
            emb, tmask = self.text_emb[index], self.text_mask[index]
            if self.text_emb_flipped is not None:
                emb = torch.where(flipped[:, None, None], self.text_emb_flipped[index], emb)
                tmask = torch.where(flipped[:, None], self.text_mask_flipped[index], tmask)
            out["text"], out["text_mask"] = emb, tmask
        if self.text_ids is not None:
            ids = self.text_ids[index]
            if self.text_ids_flipped is not None:
                ids = torch.where(flipped[:, None], self.text_ids_flipped[index], ids)
            out["text_ids"] = ids
        return out


class DeviceLoader:
    """Batches of a :class:`DeviceDataset`: ``len()`` batches per pass, a new device-side permutation per pass
    when ``shuffle``. ``drop_last`` drops the incomplete last batch (kept when it would leave no batch)."""

    def __init__(self, dataset: DeviceDataset, batch_size: int, *, shuffle: bool = False, drop_last: bool = False,
                 augmenter: DeviceAugmenter | None = None, channels_last: bool = False):
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.shuffle, self.augmenter, self.channels_last = shuffle, augmenter, channels_last
        self.drop_last = drop_last and len(dataset) >= self.batch_size

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n, b, device = len(self.dataset), self.batch_size, self.dataset.device
        order = torch.randperm(n, device=device) if self.shuffle else torch.arange(n, device=device)
        for i in range(len(self)):
            yield self.dataset.batch(order[i * b:(i + 1) * b], self.augmenter, self.channels_last)


def affine_matrices(theta: torch.Tensor, scale: torch.Tensor, translate: torch.Tensor) -> torch.Tensor:
    """``[B, 3, 3]`` MONAI ``Affine`` matrices on centred (row, column) pixel coordinates: rotate(theta) @
    translate(translate [B, 2]) @ scale(scale [B, 2]); the matrix maps output pixels to input pixels."""
    b = theta.shape[0]
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero, one = torch.zeros_like(theta), torch.ones_like(theta)
    rot = torch.stack([cos, -sin, zero, sin, cos, zero, zero, zero, one], -1).view(b, 3, 3)
    shift = torch.stack([one, zero, translate[:, 0], zero, one, translate[:, 1], zero, zero, one], -1).view(b, 3, 3)
    scl = torch.stack([scale[:, 0], zero, zero, zero, scale[:, 1], zero, zero, zero, one], -1).view(b, 3, 3)
    return rot @ shift @ scl


@functools.lru_cache(maxsize=8)
def pixel_points(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[3, H*W]`` centred (row, column, 1) coordinates of every output pixel: the same for every batch of one
    size, so made once per size, device and dtype."""
    ys = torch.arange(h, device=device, dtype=dtype) - (h - 1) / 2
    xs = torch.arange(w, device=device, dtype=dtype) - (w - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gy, gx, torch.ones_like(gy)]).view(3, -1)


def affine_warp(image: torch.Tensor, mask: torch.Tensor, matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``image [B, C, H, W]`` (bilinear) and ``mask [B, 1, H, W]`` (nearest) through ``matrices``
    (:func:`affine_matrices`), border padding: MONAI ``Affine(..., padding_mode="border")``."""
    b, _, h, w = image.shape
    dtype = image.dtype
    points = pixel_points(h, w, image.device, dtype)
    src = (matrices.to(dtype) @ points)[:, :2].view(b, 2, h, w)  # input (row, column), centred
    grid = torch.stack([src[:, 1] / (w / 2), src[:, 0] / (h / 2)], -1)  # [B, H, W, (x, y)], align_corners=False
    warped = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    warped_mask = F.grid_sample(mask, grid, mode="nearest", padding_mode="border", align_corners=False)
    return warped, warped_mask


class DeviceAugmenter:
    """:class:`~lvit.data.transforms.Augmenter` for a batch on the device (distributions in the module doc).

    ``__call__(image [B, C0, H, W] in [0, 1], mask [B, 1, H, W], in_channels) -> (image [B, in_channels, H, W],
    mask {0, 1}, flipped [B] bool)``; ``C0`` may be 1 for grey images that the model reads as ``in_channels``
    copies (expanded before the per-channel noise). Random numbers come from the device's generator.
    """

    def __init__(self, config: AugmentConfig | None = None):
        self.config = config or AugmentConfig()

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, in_channels: int | None = None):
        cfg = self.config
        b, _, h, w = image.shape
        dev = image.device
        u = torch.rand(b, 12, device=dev)  # every uniform draw of the batch at once

        def sym(col, half):  # U(-half, half)
            return (2 * u[:, col] - 1) * half

        def chosen(col, prob):
            return (u[:, col] < prob).view(b, 1, 1, 1)

        if cfg.affine_prob > 0:
            theta = sym(1, math.radians(cfg.rotate_deg))
            scale = 1 + torch.stack([sym(2, cfg.scale), sym(3, cfg.scale)], 1)
            translate = torch.stack([sym(4, cfg.translate * h), sym(5, cfg.translate * w)], 1)
            warped, warped_mask = affine_warp(image, mask, affine_matrices(theta, scale, translate))
            do = chosen(0, cfg.affine_prob)
            image, mask = torch.where(do, warped, image), torch.where(do, warped_mask, mask)
        if cfg.intensity_prob > 0:
            lo = image.amin(dim=(1, 2, 3), keepdim=True)
            span = image.amax(dim=(1, 2, 3), keepdim=True) - lo
            gamma = (cfg.gamma[0] + u[:, 7] * (cfg.gamma[1] - cfg.gamma[0])).view(b, 1, 1, 1)
            contrast = ((image - lo) / (span + 1e-7)).pow(gamma) * span + lo
            image = torch.where(chosen(6, cfg.intensity_prob), contrast, image)
            image = image + chosen(8, cfg.intensity_prob) * sym(9, cfg.shift).view(b, 1, 1, 1)
        if in_channels is not None and image.shape[1] != in_channels:
            image = image.expand(-1, in_channels, -1, -1)
        if cfg.intensity_prob > 0 and cfg.noise_std > 0:
            std = (u[:, 11] * cfg.noise_std).view(b, 1, 1, 1) * chosen(10, cfg.intensity_prob)
            image = image + std * torch.randn_like(image)
        image = image.clamp(0.0, 1.0)
        mask = (mask > 0.5).float()
        flipped = torch.zeros(b, dtype=torch.bool, device=dev)
        if cfg.hflip_prob > 0:
            flipped = torch.rand(b, device=dev) < cfg.hflip_prob
            f = flipped.view(b, 1, 1, 1)
            image, mask = torch.where(f, image.flip(-1), image), torch.where(f, mask.flip(-1), mask)
        return image, mask, flipped
