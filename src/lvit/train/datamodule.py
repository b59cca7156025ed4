"""Datasets and loaders for training: records -> encoded reports (once, cached) -> SegmentationDataset.

Reports are encoded once per split before training, through the on-disk cache of :mod:`lvit.text`, and held
in memory; the dataset hands each sample its row. Models that ignore text (LViT-T, U-Net) skip encoding.
The trainable "learned" backend tokenises instead (ids per sample) and trains its embedding layer with the
network.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from ..data.dataset import SegmentationDataset, encode_records
from ..data.layout import Record, load_split
from ..data.transforms import AugmentConfig
from ..text import default_cache_dir, get_text_encoder
from .config import TrainConfig


def model_uses_text(config: TrainConfig) -> bool:
    from ..models import reads_text

    return reads_text(config.model_name, config.model)


def build_text_encoder(config: TrainConfig, train_texts: list[str] | None = None):
    """The encoder of ``config.text.encoder`` keeping ``config.model.text_tokens`` tokens (None: no text)."""
    if not model_uses_text(config):
        return None
    spec = config.text.encoder
    if spec == "learned":
        return get_text_encoder("learned", config.model.text_tokens, texts=train_texts, dim=config.model.text_dim)
    return get_text_encoder(spec, config.model.text_tokens)


def text_cache_dir(config: TrainConfig, root: str | Path) -> Path:
    return Path(config.text.cache_dir) if config.text.cache_dir else default_cache_dir(root)


def make_dataset(records: list[Record], config: TrainConfig, encoder, cache_dir: Path | None,
                 augment: bool) -> SegmentationDataset:
    """A dataset over ``records`` with their reports encoded (or tokenised) by ``encoder``."""
    aug = AugmentConfig(hflip_prob=float(config.data.hflip_prob)) if augment else False
    kwargs = dict(augment=aug, in_channels=config.model.in_channels)
    size = config.model.image_size
    if encoder is None:
        return SegmentationDataset(records, size, **kwargs)
    if getattr(encoder, "trainable", False):
        ids, _ = encoder.tokenize([r.text for r in records])  # [N, L] int64
        ids_flipped = None
        if aug and aug.hflip_prob > 0:
            from ..text import swap_left_right

            ids_flipped, _ = encoder.tokenize([swap_left_right(r.text) for r in records])
        return SegmentationDataset(records, size, text_ids=ids, text_ids_flipped=ids_flipped, **kwargs)
    flipped = bool(aug and aug.hflip_prob > 0)
    text = encode_records(records, encoder, cache_dir, flipped=flipped)
    variants = []
    if aug and config.text.wording_variants:
        from ..data.wording import wording_variants
        from ..text.vocabulary import ReportChecker

        # A copy longer than the model's L word pieces would lose its last zones: keep every copy within L.
        counter = ReportChecker({"text_encoder": encoder.describe()}, None)

        def fits(text: str) -> bool:
            tokens = counter.count_tokens(" ".join(text.split()))
            return tokens is None or tokens <= encoder.max_tokens

        reworded = wording_variants([r.text for r in records], config.text.wording_variants, config.trainer.seed,
                                    fits=fits)
        variants = [encode_records(records, encoder, cache_dir, flipped=flipped, texts=texts) for texts in reworded]
    return SegmentationDataset.from_text(records, size, text, text_variants=variants, **kwargs)


class SeedsFromMain(Sampler):
    """The indices of ``sampler``, each paired with a seed for its item, all drawn in the main process when the
    epoch's iterator starts (the order, then one seed per index, from torch's stream).

    With DataLoader worker processes this takes the randomness out of the workers: a kept (persistent) worker's
    own stream runs on from epoch to epoch and no checkpoint holds it, so a resumed run would augment otherwise
    than an uninterrupted one. Drawn here, every random choice of an epoch follows from the main process's
    streams at the epoch's start, which the checkpoint restores; and it is the same for any number of workers
    above 0. Under DDP Lightning shards the pairs (DistributedSamplerWrapper): every process draws the same
    sequence, as their streams are seeded alike (and all restored from rank 0's on resume).
    """

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:  # Lightning tells the loader's sampler the epoch; pass it on
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        indices = list(self.sampler)
        seeds = torch.randint(0, 2**31 - 1, (len(indices),)).tolist()
        return iter(zip(indices, seeds))


class SeededItems(Dataset):
    """``dataset[index]`` for an ``(index, seed)`` of :class:`SeedsFromMain`, with the torch, numpy and Python
    streams of the worker reading it seeded by ``seed`` first: the item draws what its seed says, whichever
    worker reads it and whatever that worker read before."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, seed = item
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        return self.dataset[index]


@dataclass
class TrainData:
    train: SegmentationDataset
    val: SegmentationDataset
    encoder: object | None  # lvit.text.TextEncoder or None (model without text)
    train_sampler: Sampler | None = None  # training order (semi-supervised warm-up); None: a plain shuffle
    # Samples per training batch (None: data.batch_size); the mean-teacher sampler pairs labelled and unlabelled
    # images in each batch.
    train_batch_size: int | None = None

    def loaders(self, config: TrainConfig) -> tuple[DataLoader, DataLoader]:
        d = config.data
        workers = max(0, int(d.num_workers))
        val_batch = d.val_batch_size or d.batch_size
        train_batch = self.train_batch_size or d.batch_size
        if not workers:  # everything in this process: the item draws come from its streams, which checkpoints keep
            train = DataLoader(self.train, batch_size=train_batch, shuffle=self.train_sampler is None,
                               sampler=self.train_sampler, drop_last=False, num_workers=0)
            return train, DataLoader(self.val, batch_size=val_batch, shuffle=False, num_workers=0)
        # Worker processes, kept across epochs. The items' seeds come from the main process (SeedsFromMain). The
        # workers' base seed comes from a generator of the loader's own: drawn from torch's main stream instead,
        # it would take a number from it whenever an iterator is created, which a resumed run does once more
        # than an uninterrupted one (its first epoch, and its first validation).
        order = SeedsFromMain(self.train_sampler if self.train_sampler is not None else RandomSampler(self.train))
        common = dict(num_workers=workers, persistent_workers=True)
        train = DataLoader(SeededItems(self.train), batch_size=train_batch, sampler=order, drop_last=False,
                           generator=torch.Generator().manual_seed(config.trainer.seed), **common)
        val = DataLoader(self.val, batch_size=val_batch, shuffle=False,
                         generator=torch.Generator().manual_seed(config.trainer.seed), **common)
        return train, val


def build_train_data(config: TrainConfig, root: str | Path) -> TrainData:
    """Load the train and val splits of ``root`` and encode their reports (once, through the cache)."""
    train_records = load_split(root, "train", seed=config.trainer.seed)
    val_records = load_split(root, "val", seed=config.trainer.seed)
    encoder = build_text_encoder(config, [r.text for r in train_records])
    if encoder is not None and not getattr(encoder, "trainable", False):
        config.model.text_dim = encoder.dim  # the network's text width follows the encoder
    cache = text_cache_dir(config, root) if encoder is not None else None
    train = make_dataset(train_records, config, encoder, cache, augment=config.data.augment)
    val = make_dataset(val_records, config, encoder, cache, augment=False)
    return TrainData(train, val, encoder)


def describe_encoder(encoder) -> dict | None:
    if encoder is None:
        return None
    info = dict(encoder.describe())
    info["name"] = encoder.name
    return info


def record_training_words(run_dir: str | Path, data: TrainData) -> None:
    """Write ``run_dir/report_words.json`` (the training reports' words) for models that read reports: lvit
    predict warns when a report shares none of them (lvit.text.vocabulary)."""
    records = getattr(data.train, "records", None)
    if data.encoder is None or not records:
        return  # no reports read, or none to learn words from: predict then says it cannot check
    from ..text.vocabulary import write_training_words

    write_training_words(run_dir, [r.text for r in records])
