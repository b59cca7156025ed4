"""The torch Dataset that feeds the network, and the helper that encodes its reports (with flip variants)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.errors import DataError
from .readers import binarise_mask, read_array, read_image
from .records import Record
from .transforms import AugmentConfig, Augmenter, resize_image, resize_mask


@dataclass
class TextTensors:
    """Report embeddings of a list of records, in record order; ``*_flipped`` are those of the reports with
    "left"/"right" swapped (None unless requested), used when horizontal flip augmentation is on."""

    emb: torch.Tensor  # [N, L, D] float32
    mask: torch.Tensor  # [N, L] bool
    emb_flipped: torch.Tensor | None = None  # [N, L, D]
    mask_flipped: torch.Tensor | None = None  # [N, L]


def encode_records(records: Sequence[Record], encoder, cache_dir: str | Path | None = None,
                   flipped: bool = False, texts: Sequence[str] | None = None) -> TextTensors:
    """Encode the reports of ``records`` (or ``texts``, one per record, in their place) through the on-disk
    cache, and their left/right-swapped variants."""
    from ..text import encode_cached, swap_left_right

    texts = [r.text for r in records] if texts is None else list(texts)
    emb, mask = encode_cached(encoder, texts, cache_dir)
    if not flipped:
        return TextTensors(emb, mask)
    emb_f, mask_f = encode_cached(encoder, [swap_left_right(t) for t in texts], cache_dir)
    return TextTensors(emb, mask, emb_f, mask_f)


def to_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """``H x W x C`` uint8 -> ``H x W x in_channels``: gray is repeated, RGB -> gray uses ITU-R 601 luma."""
    c = image.shape[-1]
    if c == in_channels:
        return image
    if in_channels == 3 and c == 1:
        return np.repeat(image, 3, axis=-1)
    if in_channels == 1 and c == 3:
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.round(luma).clip(0, 255).astype(np.uint8)[..., None]
    raise ValueError(f"cannot convert {c} channels to {in_channels}")


def prepare_image(image: np.ndarray, image_size: int, in_channels: int = 3) -> torch.Tensor:
    """``H x W [x C]`` uint8 -> ``[in_channels, S, S]`` float in [0, 1]: channels converted, scaled, resized
    (bilinear, antialiased). The one preprocessing of training, testing, ``lvit predict`` and ``lvit explain``."""
    if image.ndim == 2:
        image = image[..., None]
    image = to_channels(image, in_channels)
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)  # [C, H, W]
    return resize_image(tensor, image_size)


def load_pair(record: Record, in_channels: int = 3, mask_threshold: float | None = None):
    """(image ``H x W x C`` uint8, mask ``H x W`` uint8 {0,1} or None) of a record, sizes checked."""
    image = to_channels(read_image(record.image_path), in_channels)
    if record.mask_path is None:
        return image, None
    mask = binarise_mask(read_array(record.mask_path), mask_threshold, where=record.mask_path)
    if mask.shape != image.shape[:2]:
        raise DataError(
            record.mask_path,
            f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size {image.shape[1]}x{image.shape[0]}",
        )
    return image, mask


class SegmentationDataset(Dataset):
    """Samples for training/evaluation. Item (a dict):

    ``image [C, S, S]`` float in [0, 1]; ``mask [1, S, S]`` float {0, 1} (zeros when ``has_mask`` is False);
    ``text [L, D]`` float and ``text_mask [L]`` bool (when ``text_emb`` given); ``text_ids [L]`` int64 (when
    ``text_ids`` given: learned encoder); ``index`` int; ``name`` str; ``orig_size`` (H, W) of the file,
    to map predictions back; ``has_mask`` bool; ``flipped`` bool.

    ``text_variants``: embeddings of reworded copies of the reports (:mod:`lvit.data.wording`, with flipped
    versions when flips are on). With augmentation, a sample reads its original report half the time and one of
    the reworded copies, chosen uniformly, otherwise.

    A bad file raises :class:`DataError` naming it. ``mask_resize`` "nearest" (default) or "official"
    (bilinear then > 0, as the official loader).
    """

    def __init__(
        self,
        records: Sequence[Record],
        image_size: int,
        text_emb: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        augment: bool | AugmentConfig = False,
        in_channels: int = 3,
        *,
        text_emb_flipped: torch.Tensor | None = None,
        text_mask_flipped: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_ids_flipped: torch.Tensor | None = None,
        mask_resize: str = "nearest",
        mask_threshold: float | None = None,
        cache_in_memory: bool = False,
        text_variants: Sequence[TextTensors] = (),
    ):
        self.records = list(records)
        self.image_size = int(image_size)
        self.in_channels = int(in_channels)
        n = len(self.records)
        for name, t in (("text_emb", text_emb), ("text_mask", text_mask), ("text_ids", text_ids),
                        ("text_emb_flipped", text_emb_flipped), ("text_ids_flipped", text_ids_flipped)):
            if t is not None and t.shape[0] != n:
                raise ValueError(f"{name} has {t.shape[0]} rows for {n} records")
        if text_emb is not None and text_mask is None:
            text_mask = torch.ones(text_emb.shape[:2], dtype=torch.bool)
        self.text_emb, self.text_mask = text_emb, text_mask
        self.text_emb_flipped, self.text_mask_flipped = text_emb_flipped, text_mask_flipped
        self.text_ids, self.text_ids_flipped = text_ids, text_ids_flipped
        self.text_variants = list(text_variants)
        for variant in self.text_variants:
            if text_emb is None or tuple(variant.emb.shape) != tuple(text_emb.shape):
                raise ValueError("every text variant must have the shape of text_emb "
                                 f"{None if text_emb is None else tuple(text_emb.shape)}")
        if augment is True:
            augment = AugmentConfig()
        self.augment_config: AugmentConfig | None = augment or None
        self.augmenter = Augmenter(self.augment_config) if self.augment_config else None
        if self.augment_config and self.augment_config.hflip_prob > 0:
            if text_emb is not None and text_emb_flipped is None:
                raise ValueError("hflip_prob > 0 needs text_emb_flipped (encode_records(..., flipped=True))")
            if text_ids is not None and text_ids_flipped is None:
                raise ValueError("hflip_prob > 0 needs text_ids_flipped (tokenize the swapped reports)")
            if any(v.emb_flipped is None for v in self.text_variants):
                raise ValueError("hflip_prob > 0 needs the flipped embeddings of every text variant")
        self.mask_resize = mask_resize
        self.mask_threshold = mask_threshold
        # Decoding + resizing large files (1000 px TIFFs) dominates an epoch on CPU; optionally keep the
        # resized image / mask per item (before augmentation). Each DataLoader worker has its own copy.
        self.cache_in_memory = cache_in_memory
        self._memory: dict[int, tuple] = {}

    @classmethod
    def from_text(cls, records, image_size, text: TextTensors | None, **kwargs) -> SegmentationDataset:
        if text is None:
            return cls(records, image_size, **kwargs)
        return cls(records, image_size, text.emb, text.mask, text_emb_flipped=text.emb_flipped,
                   text_mask_flipped=text.mask_flipped, **kwargs)

    def __len__(self) -> int:
        return len(self.records)

    def _load_resized(self, record: Record):
        """(image ``[C, S, S]`` float in [0, 1], mask ``[1, S, S]`` uint8 {0,1} or None, original (H, W))."""
        image_np, mask_np = load_pair(record, self.in_channels, self.mask_threshold)
        orig_size = tuple(image_np.shape[:2])
        image = prepare_image(image_np, self.image_size, self.in_channels)
        mask = None
        if mask_np is not None:
            mask = torch.from_numpy(mask_np)[None].float()  # [1, H, W]
            mask = resize_mask(mask, self.image_size, self.mask_resize).to(torch.uint8)
        return image, mask, orig_size

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        if index in self._memory:
            image, mask_u8, orig_size = self._memory[index]
        else:
            image, mask_u8, orig_size = self._load_resized(record)
            if self.cache_in_memory:
                self._memory[index] = (image, mask_u8, orig_size)
        image = image.clone()  # [C, S, S]; augmentation must not alter the cached copy
        has_mask = mask_u8 is not None
        mask = mask_u8.float() if has_mask else torch.zeros(1, self.image_size, self.image_size)  # [1, S, S]
        flipped = False
        variant = None
        if self.augmenter is not None:
            # torch's RNG is seeded per DataLoader worker and by torch.manual_seed: reproducible, no repeats.
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
            image, mask = self.augmenter(image, mask, seed)
            if (self.augment_config.hflip_prob > 0
                    and np.random.default_rng(seed).random() < self.augment_config.hflip_prob):
                image, mask, flipped = image.flip(-1), mask.flip(-1), True
            if self.text_variants:
                pick = np.random.default_rng([seed, 1])
                if pick.random() >= 0.5:
                    variant = self.text_variants[int(pick.integers(len(self.text_variants)))]
        item = {
            "image": image.contiguous(),
            "mask": mask.contiguous(),
            "index": index,
            "name": record.name,
            "orig_size": orig_size,
            "has_mask": has_mask,
            "flipped": flipped,
        }
        if self.text_emb is not None:
            if variant is not None:
                emb, tmask = (variant.emb_flipped, variant.mask_flipped) if flipped else (variant.emb, variant.mask)
            else:
                emb, tmask = (self.text_emb_flipped, self.text_mask_flipped) if flipped \
                    else (self.text_emb, self.text_mask)
            item["text"] = emb[index].float()
            item["text_mask"] = tmask[index].bool() if tmask is not None else torch.ones(emb.shape[1], dtype=torch.bool)
        if self.text_ids is not None:
            ids = self.text_ids_flipped if flipped else self.text_ids
            item["text_ids"] = ids[index]
        return item
