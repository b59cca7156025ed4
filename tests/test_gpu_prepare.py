"""bench/gpu/prepare.py: the 224 px copy made for the GPU machine must give training the same tensors as the
original files (images up to uint8 rounding, masks exactly, with the official mask resize)."""

from __future__ import annotations

from pathlib import Path

import torch
from files import load_gpu_prepare


def test_resized_copy_feeds_training_the_same_tensors(tmp_path):
    from lvit.data import SegmentationDataset, generate_synthetic, load_split

    src = generate_synthetic(tmp_path / "src", n_train=3, n_val=2, n_test=2, size=96, seed=3, force=True,
                             progress=False)
    dst = tmp_path / "small"
    n = load_gpu_prepare().resize_monuseg(Path(src), dst, size=32)
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


def test_packed_copy_round_trips_and_is_checked(tmp_path):
    """--qata packing: lossless WebP gives every image and mask back byte-identical in pixels (with the records'
    names and reports); lossy WebP gives the recorded decoded pixels (hash-checked) and its coding error; a copy
    whose pixels differ from the recorded hashes is reported."""
    import json
    import lzma

    import numpy as np
    from PIL import Image

    from lvit.data import generate_synthetic, load_split, read_image

    prep = load_gpu_prepare()
    src = Path(generate_synthetic(tmp_path / "src", n_train=3, n_val=2, n_test=2, size=48, seed=1, force=True,
                                  progress=False))
    manifest = prep.pack_qata(src, tmp_path / "exact" / "data", quality=0, workers=1)
    assert manifest["coding_error"]["images_exact"] == 7 and manifest["coding_error"]["max_abs_grey_levels"] == 0
    assert prep.unpack_qata(tmp_path / "exact", tmp_path / "out", workers=1) == {"n": 7, "problems": []}
    for split in ("train", "val", "test"):
        original, copy = load_split(src, split), load_split(tmp_path / "out", split)
        assert [(r.name, r.text) for r in copy] == [(r.name, r.text) for r in original]
        for a, b in zip(original, copy):
            assert np.array_equal(read_image(a.image_path), read_image(b.image_path))
            assert np.array_equal(np.array(Image.open(a.mask_path)), np.array(Image.open(b.mask_path)))

    lossy = prep.pack_qata(src, tmp_path / "lossy" / "data", quality=90, workers=1)
    err = lossy["coding_error"]
    assert err["images_exact"] < 7 and err["psnr_db"]["min"] > 30 and err["max_abs_grey_levels"] > 0
    assert prep.unpack_qata(tmp_path / "lossy", tmp_path / "out2", workers=1, limit=1) == {"n": 3, "problems": []}
    assert [len(load_split(tmp_path / "out2", s)) for s in ("train", "val", "test")] == [1, 1, 1]
    # Lossy images: within the max |error| recorded for each (and overall); masks still bit-exact.
    for split in ("train", "val", "test"):
        entry = lossy["splits"][split]["entries"][0]
        a, b = load_split(src, split)[0], load_split(tmp_path / "out2", split)[0]
        diff = np.abs(read_image(a.image_path).astype(np.int16) - read_image(b.image_path).astype(np.int16))
        assert int(diff.max()) == entry["max_err"] <= err["max_abs_grey_levels"]
        assert np.array_equal(np.array(Image.open(a.mask_path)), np.array(Image.open(b.mask_path)))

    path = tmp_path / "lossy" / "data" / "manifest.json.xz"
    data = json.loads(lzma.decompress(path.read_bytes()))
    data["splits"]["val"]["entries"][0]["mask_sha256"] = "0" * 32
    path.write_bytes(lzma.compress(json.dumps(data).encode()))
    problems = prep.unpack_qata(tmp_path / "lossy", tmp_path / "out3", workers=1)["problems"]
    assert len(problems) == 1 and "mask differs" in problems[0]
