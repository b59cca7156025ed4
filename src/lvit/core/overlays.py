"""Overlays: the image with the ground-truth contour (green) and the predicted contour (red), at image size.

Pure numpy (no OpenCV): a contour is the mask minus its erosion, thickened for large images so it stays
visible when the picture is shown scaled down.
"""

from __future__ import annotations

import numpy as np

GT_COLOR = (0, 220, 0)  # green
PRED_COLOR = (255, 40, 40)  # red
BOTH_COLOR = (255, 220, 0)  # yellow where the two contours coincide


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (pixels outside the image count as background)."""
    padded = np.pad(mask, 1, constant_values=False)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    return (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:])


def contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boundary pixels of a binary ``H x W`` mask, ``thickness`` pixels wide (inwards and outwards)."""
    mask = np.asarray(mask).astype(bool)
    edge = mask & ~_erode(mask)
    for _ in range(max(0, thickness - 1)):
        edge = _dilate(edge)
    return edge


def default_thickness(shape: tuple[int, ...]) -> int:
    return max(1, round(max(shape[:2]) / 256))


def to_rgb(image: np.ndarray) -> np.ndarray:
    """``H x W``, ``H x W x 1`` or ``H x W x 3/4`` uint8 -> ``H x W x 3`` uint8."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def overlay(image: np.ndarray, pred: np.ndarray | None, gt: np.ndarray | None = None,
            thickness: int | None = None) -> np.ndarray:
    """The image (``H x W [x C]`` uint8) with GT (green) and prediction (red) contours -> ``H x W x 3``."""
    out = to_rgb(image).copy()
    thickness = thickness or default_thickness(out.shape)
    gt_edge = contour(gt, thickness) if gt is not None else np.zeros(out.shape[:2], bool)
    pred_edge = contour(pred, thickness) if pred is not None else np.zeros(out.shape[:2], bool)
    for shape_of, name in ((gt, "ground truth"), (pred, "prediction")):
        if shape_of is not None and np.asarray(shape_of).shape[:2] != out.shape[:2]:
            raise ValueError(f"{name} mask {np.asarray(shape_of).shape[:2]} does not match image {out.shape[:2]}")
    out[gt_edge & ~pred_edge] = GT_COLOR
    out[pred_edge & ~gt_edge] = PRED_COLOR
    out[gt_edge & pred_edge] = BOTH_COLOR
    return out


def probability_png(prob: np.ndarray) -> np.ndarray:
    """A probability map in [0, 1] -> ``H x W`` uint8 (0..255) for saving as a grey PNG."""
    return np.clip(np.round(np.asarray(prob, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def mask_png(mask: np.ndarray) -> np.ndarray:
    """A binary mask -> ``H x W`` uint8 in {0, 255} (the datasets' mask convention)."""
    return np.asarray(mask).astype(bool).astype(np.uint8) * 255
