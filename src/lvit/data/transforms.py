"""Resizing and training augmentation.

Policy (see docs/DATA.md): small affine (rotation, scale, translation), intensity jitter (contrast, shift,
noise); vertical flip never (a chest radiograph is never upside down); horizontal flip OFF by default,
because it swaps the patient's left and right lung. When enabled (``hflip_prob > 0``) the dataset flips the
image and mask together and uses the embedding of the report with "left"/"right" swapped
(:func:`lvit.text.swap_left_right`), so image and text stay consistent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    affine_prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1  # +-10 % zoom
    translate: float = 0.05  # fraction of the image side
    intensity_prob: float = 0.5
    gamma: tuple[float, float] = (0.8, 1.25)  # contrast via gamma
    shift: float = 0.05  # additive brightness, in [0, 1] units
    noise_std: float = 0.01
    hflip_prob: float = 0.0  # off: a flip swaps left/right lung; when on, the report is swapped too

    @classmethod
    def from_dict(cls, d: dict | None) -> AugmentConfig:
        d = dict(d or {})
        if "gamma" in d:
            d["gamma"] = tuple(d["gamma"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def resize_image(image: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """``[C, H, W]`` float -> ``[C, size, size]``, bilinear with antialiasing when shrinking."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(image.shape[-2:]) == size:
        return image
    out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def resize_mask(mask: torch.Tensor, size: int | tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """``[1, H, W]`` {0, 1} -> ``[1, size, size]`` {0, 1}.

    ``mode="nearest"`` (default) keeps labels exact; ``"official"`` reproduces the official loader:
    bilinear resize (no antialias, like cv2.resize), then foreground where > 0 (slightly grows objects).
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(mask.shape[-2:]) == size:
        return mask
    if mode == "nearest":
        return F.interpolate(mask[None], size=size, mode="nearest-exact")[0]
    if mode == "official":
        out = F.interpolate(mask[None], size=size, mode="bilinear", align_corners=False)[0]
        return (out > 0).to(mask.dtype)
    raise ValueError(f"unknown mask resize mode {mode!r}")


def _plain(x) -> torch.Tensor:
    """MONAI returns MetaTensors; the rest of lvit uses plain tensors."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def to_original_size(prob: torch.Tensor, orig_size: tuple[int, int]) -> torch.Tensor:
    """Map a prediction ``[..., h, w]`` (probabilities or logits) back to the file's ``(H, W)``, bilinearly;
    threshold afterwards. Used to score and save predictions at the original resolution."""
    lead = prob.shape[:-2]
    flat = prob.reshape(-1, 1, *prob.shape[-2:]).float()
    out = F.interpolate(flat, size=tuple(int(s) for s in orig_size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *out.shape[-2:])


class Augmenter:
    """Random affine + intensity jitter on an ``image [C, H, W]`` / ``mask [1, H, W]`` pair (MONAI).

    The image is bilinearly resampled and the mask by nearest neighbour, both with the same transform.
    Randomness comes from ``seed`` per call, so results are reproducible and DataLoader workers (which
    seed torch differently) never repeat each other.
    """

    def __init__(self, config: AugmentConfig | None = None):
        self.config = config or AugmentConfig()
        self._by_size: dict[tuple[int, int], object] = {}

    def _build(self, h: int, w: int):
        from monai.data import set_track_meta
        from monai.transforms import (
            Compose,
            RandAdjustContrastd,
            RandAffined,
            RandGaussianNoised,
            RandShiftIntensityd,
        )

        # Plain tensors in, plain tensors out: MONAI's MetaTensor bookkeeping (applied-operation lists) is pure
        # overhead here, and with it the augmented epochs grew slower within a run (20 -> 28 s on the synth preset).
        set_track_meta(False)
        cfg = self.config
        return Compose(
            [
                RandAffined(
                    keys=("image", "mask"),
                    prob=cfg.affine_prob,
                    rotate_range=(cfg.rotate_deg * torch.pi / 180.0,),
                    scale_range=(cfg.scale, cfg.scale),
                    translate_range=(cfg.translate * h, cfg.translate * w),  # pixels
                    mode=("bilinear", "nearest"),
                    padding_mode="border",
                ),
                RandAdjustContrastd(keys="image", prob=cfg.intensity_prob, gamma=cfg.gamma),
                RandShiftIntensityd(keys="image", prob=cfg.intensity_prob, offsets=cfg.shift),
                RandGaussianNoised(keys="image", prob=cfg.intensity_prob, std=cfg.noise_std),
            ]
        )

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.affine_prob <= 0 and self.config.intensity_prob <= 0:
            return image, mask  # nothing random to do (flip is the dataset's job); skip importing MONAI
        size = tuple(image.shape[-2:])
        if size not in self._by_size:
            self._by_size[size] = self._build(*size)
        transform = self._by_size[size]
        transform.set_random_state(seed=seed % (2**32))
        out = transform({"image": image, "mask": mask})
        image = _plain(out["image"]).float().clamp_(0.0, 1.0)
        mask = (_plain(out["mask"]) > 0.5).float()
        return image, mask
