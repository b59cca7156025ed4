"""The training order of a semi-supervised run: labelled images only during the warm-up, every image after it.

Why a warm-up on labelled batches: pseudo labels are only as good as the model that makes them. When warm-up
batches mix 2 labelled with 6 ignored unlabelled images (a plain shuffle of the whole set), the model sees the
labelled images at a quarter of the rate, is still weak when the pseudo labels start, and the pseudo labels then
anchor it there. On the synthetic set with 160 of 640 masks, LViT with such a warm-up stayed at test Dice 0.49
(it never learned to read the reports) while supervised training on the 160 masks alone reached 0.80
(bench/RESULTS.md, "semi-gpu").

Every epoch has ``len(dataset)`` indices in both phases, so Lightning's batch count, the learning-rate
schedule and the step budget do not change at the switch: a warm-up epoch is as many batches as a later one,
drawn from reshuffled passes over the labelled subset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler


class WarmupSampler(Sampler[int]):
    """Indices ``[0, N)`` for one epoch: labelled ones only while ``epoch < warmup_epochs``, then all of them.

    ``labelled`` ``[N]`` bool. Shuffled with a generator seeded by ``(seed, epoch)``: deterministic, and a resumed
    run draws exactly what the uninterrupted one drew. The epoch is read from ``epoch_source()`` when the epoch's
    iterator is created (the module sets it to its ``current_epoch``, which is right after a resume too, when
    Lightning builds the first iterator before any ``set_epoch``); otherwise from ``set_epoch`` (Lightning calls it
    every epoch). Under DDP Lightning wraps this sampler in its ``DistributedSamplerWrapper``, which shards the
    indices this sampler yields.
    """

    def __init__(self, labelled: np.ndarray, warmup_epochs: int, seed: int):
        self.labelled = np.asarray(labelled, dtype=bool)
        self.warmup_epochs = int(warmup_epochs)
        self.seed = int(seed)
        self.epoch = 0
        self.epoch_source: Callable[[], int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labelled)

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.labelled)
        rng = np.random.default_rng([self.seed, epoch])
        pool = np.flatnonzero(self.labelled)
        if epoch >= self.warmup_epochs or pool.size == 0 or pool.size == n:
            return rng.permutation(n)
        passes = -(-n // pool.size)  # ceil: enough reshuffled passes over the labelled subset to fill an epoch
        return np.concatenate([pool[rng.permutation(pool.size)] for _ in range(passes)])[:n]

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch_source() if self.epoch_source is not None else self.epoch
        return iter(self.order(epoch).tolist())


class PairedSampler(Sampler[int]):
    """The mean-teacher training order: every batch is ``batch_size`` labelled indices followed by
    ``unlabelled_batch`` unlabelled ones (the DataLoader's batch size is their sum).

    Why pairs instead of one shuffle of all images: with a quarter of the masks a shuffled batch of 8 holds ~2
    labelled images, so the masks get a quarter of the supervised steps the steps-matched baseline gives them
    (what cost EPI on QaTa-COV19). Here the labelled part of each epoch is exactly the baseline's: ``WarmupSampler``'s
    labelled-only order for that (seed, epoch), cut into batches of ``batch_size``; the unlabelled images come on
    top. An epoch has ``ceil(N / batch_size)`` batches (N = all training images), as in the baseline; only the
    last labelled part may be shorter. The unlabelled part is drawn from reshuffled passes over the unlabelled
    images seeded by (seed, epoch, 1). The module ignores the unlabelled part during its warm-up.

    The epoch is read as in :class:`WarmupSampler` (``epoch_source``, else ``set_epoch``): exact on resume.
    """

    def __init__(self, labelled: np.ndarray, batch_size: int, unlabelled_batch: int, seed: int):
        self.labelled = np.asarray(labelled, dtype=bool)
        self.batch_size = int(batch_size)
        self.unlabelled_pool = np.flatnonzero(~self.labelled)
        self.unlabelled_batch = int(unlabelled_batch) if self.unlabelled_pool.size else 0
        self.seed = int(seed)
        self.epoch = 0
        self.epoch_source: Callable[[], int] | None = None
        # The labelled stream of every epoch: the warm-up order of the baseline (a warm-up that never ends).
        self._labelled_order = WarmupSampler(self.labelled, warmup_epochs=2**62, seed=self.seed)

    @property
    def loader_batch_size(self) -> int:
        return self.batch_size + self.unlabelled_batch

    @property
    def num_batches(self) -> int:
        return -(-len(self.labelled) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.labelled) + self.num_batches * self.unlabelled_batch

    def order(self, epoch: int) -> np.ndarray:
        labelled = self._labelled_order.order(epoch)  # [N]
        batches, extra = self.num_batches, self.unlabelled_batch
        if extra == 0:
            return labelled
        rng = np.random.default_rng([self.seed, epoch, 1])
        pool = self.unlabelled_pool
        passes = -(-batches * extra // pool.size)
        unlabelled = np.concatenate([pool[rng.permutation(pool.size)] for _ in range(passes)])
        parts = []
        for b in range(batches):
            parts.append(labelled[b * self.batch_size:(b + 1) * self.batch_size])
            parts.append(unlabelled[b * extra:(b + 1) * extra])
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch_source() if self.epoch_source is not None else self.epoch
        return iter(self.order(epoch).tolist())
