"""bench/gpu/prepare.py: the 224 px copy made for the GPU machine must give training the same tensors as the
original files (images up to uint8 rounding, masks exactly, with the official mask resize)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _load_prepare():
    spec = importlib.util.spec_from_file_location("bench_gpu_prepare", REPO / "bench" / "gpu" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resized_copy_feeds_training_the_same_tensors(tmp_path):
    from lvit.data import SegmentationDataset, generate_synthetic, load_split

    src = generate_synthetic(tmp_path / "src", n_train=3, n_val=2, n_test=2, size=96, seed=3, force=True,
                             progress=False)
    dst = tmp_path / "small"
    n = _load_prepare().resize_monuseg(Path(src), dst, size=32)
    assert n == 2 * (3 + 2 + 2)  # every image and mask of the three splits
    for split in ("train", "val", "test"):
        original, copy = load_split(src, split), load_split(dst, split)
        assert [r.name for r in copy] == [r.name for r in original] and [r.text for r in copy] == [
            r.text for r in original]
        a = SegmentationDataset(original, 32, mask_resize="official")
        b = SegmentationDataset(copy, 32, mask_resize="official")
        for i in range(len(a)):
            assert b[i]["orig_size"] == (32, 32)
            assert torch.equal(a[i]["mask"], b[i]["mask"])  # official resize done once, then kept exactly
            assert (a[i]["image"] - b[i]["image"]).abs().max() <= 0.5 / 255 + 1e-6  # uint8 rounding only
