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
