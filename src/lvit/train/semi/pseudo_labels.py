"""Exponential Pseudo-label Iteration (EPI): a per-image bank of soft pseudo labels.

Paper (LViT, Li et al., IEEE TMI 2023, Eq. 8): for an unlabelled image the pseudo label used at epoch t is

    P_t = beta * P_{t-1} + (1 - beta) * prediction_t,        beta = 0.99,

an exponential moving average of the model's per-pixel probabilities over epochs. The official code ships no
EPI at all, so the choices below are ours (documented in docs/SEMI_SUPERVISED.md):

* Initialisation: the first prediction given for an image initialises its pseudo label (P_0 = prediction);
  the semi-supervised module gives the warm-up model's eval-mode prediction (``initialise_bank``). A constant
  start (0 or 0.5) would keep a weight beta**t on that constant: with beta = 0.99 still 37% after 100 epochs,
  i.e. the pseudo labels would stay washed out for most of a run.
* Update: per training step, for the images of that step, so each image is updated once per epoch (the epoch
  is passed in and a second update of the same image in the same epoch, e.g. an index that
  ``DistributedSampler`` repeats to even out the ranks, is ignored). ``update`` returns P_t, the value to train
  against, so the current prediction takes part with weight 1 - beta, as Eq. 8 reads.
* Storage: float16 per pixel at the training resolution, in memory for small datasets, else an ``np.memmap``
  in the run folder (QaTa-COV19: 7,145 images x 224 x 224 x 2 bytes = 717 MB stays off the heap).
* DDP: ``gather_updates`` all-gathers (indices, probabilities) of every rank before ``update``, so every rank
  applies the same updates in the same order and all banks stay identical without any broadcast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...core.errors import CheckpointError, ConfigError

# Above this many bytes of float16 storage the bank lives in a memmap on disk (storage="auto").
DEFAULT_MEMORY_LIMIT_BYTES = 256 * 1024**2
NEVER = -1  # last_epoch value of an image whose pseudo label was never set


@dataclass(frozen=True)
class EPIConfig:
    beta: float = 0.99  # paper Eq. 8
    storage: str = "auto"  # "memory" | "disk" | "auto"
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES


class PseudoLabelBank:
    """Soft pseudo labels ``[N, H, W]`` (float16) for the N images of a training set, addressed by dataset index.

    Only unlabelled images are ever updated, but indexing by the dataset index keeps the bookkeeping trivial;
    labelled images just stay uninitialised (``N * H * W * 2`` bytes is the bound either way).
    """

    def __init__(
        self,
        num_items: int,
        size: tuple[int, int],
        beta: float = 0.99,
        storage: str = "auto",
        path: str | Path | None = None,
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    ):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"EPI beta must be in [0, 1), got {beta}")
        if num_items < 1 or len(size) != 2 or min(size) < 1:
            raise ConfigError(f"pseudo-label bank needs >= 1 item and a 2-D size, got {num_items}, {size}")
        if storage not in ("memory", "disk", "auto"):
            raise ConfigError(f"pseudo-label storage must be memory, disk or auto, got {storage!r}")
        self.num_items = int(num_items)
        self.size = (int(size[0]), int(size[1]))
        self.beta = float(beta)
        nbytes = self.num_items * self.size[0] * self.size[1] * 2
        on_disk = storage == "disk" or (storage == "auto" and nbytes > memory_limit_bytes)
        if on_disk:
            if path is None:
                raise ConfigError(
                    f"pseudo-label bank of {nbytes / 1024**2:.0f} MB needs a file path (the run folder) "
                    "for disk storage"
                )
            self.path: Path | None = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The memmap is scratch state: the checkpoint (state_dict) is the durable copy.
            self._values = np.lib.format.open_memmap(
                self.path, mode="w+", dtype=np.float16, shape=(self.num_items, *self.size)
            )
        else:
            self.path = None
            self._values = np.zeros((self.num_items, *self.size), dtype=np.float16)
        self._last_epoch = np.full(self.num_items, NEVER, dtype=np.int64)

    # ------------------------------------------------------------------ queries
    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def initialised(self, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Bool ``[len(indices)]`` (or ``[N]``): which images have a pseudo label."""
        seen = self._last_epoch != NEVER
        if indices is None:
            return torch.from_numpy(seen.copy())
        return torch.from_numpy(seen[_as_index_array(indices, self.num_items)])

    def get(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Pseudo labels of ``indices`` as float32 ``[B, 1, H, W]`` (zeros where never set)."""
        idx = _as_index_array(indices, self.num_items)
        return torch.from_numpy(np.asarray(self._values[idx], dtype=np.float32)).unsqueeze(1)

    # ------------------------------------------------------------------ update
    def update(self, indices: Sequence[int] | torch.Tensor, probs: torch.Tensor, epoch: int) -> torch.Tensor:
        """Apply Eq. 8 to ``indices`` with ``probs`` ``[B, 1, H, W]`` or ``[B, H, W]`` in [0, 1]; return P_t.

        Returns float32 ``[B, 1, H, W]`` (on ``probs``' device): the pseudo labels after this step, which are the
        training targets. An image already updated in ``epoch`` keeps its value (and that value is returned);
        the first occurrence wins when an index repeats within one call.
        """
        return self._step(indices, probs, epoch, write=True)

    def preview(self, indices: Sequence[int] | torch.Tensor, probs: torch.Tensor, epoch: int) -> torch.Tensor:
        """What :meth:`update` would return, without storing anything.

        The training step uses this for its targets and applies the real update after the step, from the
        predictions of every DDP rank, so all ranks' banks receive the same updates in the same order.
        """
        return self._step(indices, probs, epoch, write=False)

    def _step(self, indices, probs: torch.Tensor, epoch: int, write: bool) -> torch.Tensor:
        idx = _as_index_array(indices, self.num_items)
        probs = _as_bhw(probs, self.size, len(idx))
        device = probs.device
        new = probs.detach().to("cpu", torch.float32).numpy()
        out = np.empty((len(idx), *self.size), dtype=np.float32)
        first_row: dict[int, int] = {}  # item -> row of its first occurrence in this call
        for row, item in enumerate(idx.tolist()):
            if item in first_row:
                out[row] = out[first_row[item]]
                continue
            first_row[item] = row
            if self._last_epoch[item] == epoch:  # already updated this epoch: keep
                out[row] = self._values[item]
                continue
            if self._last_epoch[item] == NEVER:
                value = new[row]
            else:
                value = self.beta * self._values[item].astype(np.float32) + (1.0 - self.beta) * new[row]
            # Targets are exactly the stored float16 numbers, so a resumed run trains against the same values.
            value = value.astype(np.float16)
            out[row] = value
            if write:
                self._values[item] = value
                self._last_epoch[item] = epoch
        return torch.from_numpy(out).unsqueeze(1).to(device)

    # ------------------------------------------------------------------ quality
    def dice_against(
        self, indices: Sequence[int] | torch.Tensor, masks: torch.Tensor, threshold: float = 0.5
    ) -> torch.Tensor:
        """Per-image Dice ``[B]`` of the thresholded pseudo labels against hidden masks ``[B, 1, H, W]``.

        Both empty counts as 1.0 (the project's metric convention); images without a pseudo label give NaN.
        """
        from ...core.metrics import batch_dice_iou

        pseudo = self.get(indices) > threshold  # [B, 1, H, W]
        target = _as_bhw(masks, self.size, pseudo.shape[0]).unsqueeze(1).cpu() > 0.5
        dice = batch_dice_iou(pseudo, target)[0].double()
        seen = self.initialised(indices)
        return torch.where(seen, dice, torch.full_like(dice, float("nan"))).float()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (``torch.load(weights_only=True)`` works); restores bit-exactly."""
        return {
            "values": torch.from_numpy(np.array(self._values, dtype=np.float16, copy=True)),
            "last_epoch": torch.from_numpy(self._last_epoch.copy()),
            "beta": torch.tensor(self.beta, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            values, last_epoch, beta = state["values"], state["last_epoch"], state["beta"]
        except KeyError as exc:
            raise CheckpointError(f"pseudo-label bank state lacks {exc.args[0]!r}") from None
        expected = (self.num_items, *self.size)
        if tuple(values.shape) != expected or tuple(last_epoch.shape) != (self.num_items,):
            raise CheckpointError(
                f"pseudo-label bank in the checkpoint has shape {tuple(values.shape)}, this run needs {expected} "
                "(different training set or image size)"
            )
        self._values[...] = values.to(torch.float16).numpy()
        self._last_epoch[...] = last_epoch.to(torch.int64).numpy()
        self.beta = float(beta)
        if isinstance(self._values, np.memmap):
            self._values.flush()


# ---------------------------------------------------------------------- DDP
AllGather = Callable[[torch.Tensor], torch.Tensor]


def gather_updates(
    indices: torch.Tensor, probs: torch.Tensor, all_gather: AllGather, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Collect every rank's (indices ``[B]``, probs ``[B, 1, H, W]``) so each rank can apply the same update.

    ``all_gather(t)`` must return ``[world_size, *t.shape]`` (``LightningModule.all_gather`` or a wrapper over
    ``torch.distributed.all_gather``); tensors of equal shape on every rank are required, so the batch is padded
    to the largest rank's size with index -1 rows that are dropped afterwards. Returns rank-major order
    (rank 0's items first), identical on every rank.
    """
    if world_size <= 1:
        return indices, probs
    local = torch.tensor([indices.numel()], device=probs.device)
    sizes = all_gather(local).reshape(world_size)
    largest = int(sizes.max())
    pad = largest - indices.numel()
    padded_idx = torch.cat([indices.to(probs.device).long(), torch.full((pad,), -1, device=probs.device)])
    padded_probs = torch.cat([probs.detach(), probs.new_zeros((pad, *probs.shape[1:]))])
    all_idx = all_gather(padded_idx).reshape(-1)  # [W * largest]
    all_probs = all_gather(padded_probs).reshape(-1, *probs.shape[1:])
    keep = all_idx >= 0
    return all_idx[keep], all_probs[keep]


# ---------------------------------------------------------------------- helpers
def _as_index_array(indices: Sequence[int] | torch.Tensor, n: int) -> np.ndarray:
    idx = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    idx = idx.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"pseudo-label index out of range [0, {n}): {idx.min()}..{idx.max()}")
    return idx


def _as_bhw(x: torch.Tensor, size: tuple[int, int], batch: int) -> torch.Tensor:
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"pseudo labels are single-channel, got {tuple(x.shape)}")
        x = x[:, 0]
    if tuple(x.shape) != (batch, *size):
        raise ValueError(f"expected [{batch}, 1, {size[0]}, {size[1]}] probabilities, got {tuple(x.shape)}")
    return x
