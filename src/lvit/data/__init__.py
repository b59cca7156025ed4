"""Datasets: the layouts (official LViT, annotation file), readers, validation, the torch Dataset and the
synthetic generator (loaded on first use: it needs SciPy, which reading a dataset does not)."""

import importlib

from .dataset import (
    SegmentationDataset,
    TextTensors,
    encode_records,
    load_pair,
    prepare_image,
    to_channels,
)
from .layout import detect_layout, list_images, load_split
from .readers import (
    IMAGE_SUFFIXES,
    binarise_mask,
    is_image_file,
    read_array,
    read_image,
    read_mask,
)
from .records import Problem, Record
from .transforms import (
    AugmentConfig,
    Augmenter,
    resize_image,
    resize_mask,
    to_original_size,
)
from .validate import check_data, format_problems

__all__ = [
    "IMAGE_SUFFIXES",
    "AugmentConfig",
    "Augmenter",
    "Problem",
    "Record",
    "SegmentationDataset",
    "TextTensors",
    "binarise_mask",
    "check_data",
    "detect_layout",
    "encode_records",
    "format_problems",
    "generate_synthetic",
    "is_image_file",
    "list_images",
    "load_pair",
    "load_split",
    "make_case",
    "parse_report",
    "prepare_image",
    "read_array",
    "read_image",
    "read_mask",
    "report_for",
    "resize_image",
    "resize_mask",
    "to_channels",
    "to_original_size",
    "zone_at",
]


_SYNTHETIC = ("generate_synthetic", "make_case", "parse_report", "report_for", "zone_at")


def __getattr__(name: str):
    if name in _SYNTHETIC:
        return getattr(importlib.import_module(".synthetic", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
