"""Evaluation: metrics, test reports (``lvit test``), prediction (``lvit predict``) and overlays."""

from ..core.metrics import SegmentationScores, batch_dice_iou, dice_iou, dice_iou_from_counts
from ..core.overlays import contour, overlay

__all__ = ["SegmentationScores", "batch_dice_iou", "contour", "dice_iou", "dice_iou_from_counts", "overlay"]
