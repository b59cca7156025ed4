"""bench/monuseg.py on real MoNuSeg data (../shared): readers (PNG train/val, TIF test), the xlsx text table,
the official augmentation and mask resize, the wall-clock budget, resume, and the RESULTS.md section.

Kept small: 2 images per split at 64 px, base_channels 8, one epoch per call.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from files import load_bench

from lvit.core.io import update_results_file

bench = load_bench("bench/monuseg.py", "bench_monuseg")


@pytest.fixture(scope="module")
def monuseg(shared_dir) -> Path:
    root = shared_dir / "datasets" / "MoNuSeg"
    if not (root / "Train_Folder").is_dir():
        pytest.skip(f"{root} is absent: the MoNuSeg tests need the shared data set")
    return root


def test_real_split_tables_and_readers(monuseg):
    from lvit.data import load_split, read_image, read_mask

    train, test = load_split(monuseg, "train"), load_split(monuseg, "test")
    assert (len(train), len(load_split(monuseg, "val")), len(test)) == (24, 6, 14)
    assert all(r.image_path.suffix.lower() == ".tif" for r in test)
    assert all(r.mask_path.name == Path(r.image_path.name).with_suffix(".png").name for r in test)
    assert all(r.text and "EOF" not in r.text for r in train + test)  # the Description column, unpadded
    image, mask = read_image(test[0].image_path), read_mask(test[0].mask_path)
    assert image.shape == (1000, 1000, 3) and image.dtype.name == "uint8"
    assert mask.shape == (1000, 1000) and set(mask.ravel().tolist()) <= {0, 1} and 0 < mask.mean() < 0.6


def test_official_augmenter_keeps_image_and_mask_aligned():
    aug = bench.OfficialAugmenter()
    mask = (torch.rand(1, 32, 32) > 0.7).float()  # [1, H, W]
    mask[:, :4, :] = 1.0  # asymmetric, so a rotation or flip is visible
    image = torch.cat([mask, torch.rand(2, 32, 32)])  # [3, H, W]: channel 0 is the mask
    changed = 0
    for seed in range(40):
        img, msk = aug(image.clone(), mask.clone(), seed)
        assert img.shape == image.shape and msk.shape == mask.shape
        assert set(msk.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(img[0:1], msk)  # the same geometric transform hit both
        changed += not torch.equal(msk, mask)
        again = aug(image.clone(), mask.clone(), seed)
        assert torch.equal(again[0], img) and torch.equal(again[1], msk)  # reproducible per seed
    # official: p 0.5 rot90+flip (one of 8 is the identity), p 0.25 rotation (angle 0 possible), else nothing
    assert 15 <= changed <= 35


def test_one_epoch_train_test_resume_and_results(monuseg, tmp_path):
    s = bench.BenchSettings(data=monuseg, runs=tmp_path / "runs", minutes=1e-4, max_epochs=3, image_size=64,
                            base_channels=8, limit=2, progress=False)
    first = bench.train_model(s, "lvit")
    # the budget (6 ms) stops after the first epoch, long before max_epochs
    assert first["epochs"] == 1 and first["stopped_by_budget"]
    run = s.runs / "lvit"
    assert (run / "checkpoints" / "best.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "minilm" in (run / "config.yaml").read_text()  # LViT (text) read the real reports
    assert any((s.runs / "text_cache").iterdir())  # encoded reports cached in the runs folder, not in ../shared

    second = bench.train_model(s, "lvit", resume=True)  # a fresh budget: one more epoch
    assert second["epochs"] == 2
    curve = bench.read_curve(run)
    assert [e for e, _, _ in curve] == [1, 2] and all(0.0 <= d <= 1.0 for _, d, _ in curve)

    figures = bench.test_model(s, "lvit")  # 2 TIF test images, official-protocol ground truth
    assert figures["n_test"] == 2
    assert 0.0 <= figures["test_dice"] <= 1.0 and 0.0 <= figures["test_iou"] <= figures["test_dice"] + 1e-9

    png = bench.plot_curves(s.runs, bench.MODELS, tmp_path / "curve.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = {"lvit": {**second, **figures, "train_seconds": sum(c[2] for c in curve), "text_encoder": "minilm",
                        "machine": "test"}}
    md = tmp_path / "RESULTS.md"
    md.write_text("# results\n\n<!-- other:start -->\nkeep me\n<!-- other:end -->\n")
    bench.write_section(bench.render(results, s, None), md)
    bench.write_section(bench.render(results, s, None), md)  # replaces its own section, once
    text = md.read_text()
    assert "keep me" in text and text.count(bench.START) == 1 and "LViT (text) (`lvit`)" in text
    assert "80.36 / 67.31" in text and not math.isnan(figures["test_dice"])


def test_official_mask_resize_grows_small_nuclei(monuseg):
    """The official loader resizes masks bilinearly and keeps every pixel > 0: at 224 px the nuclei come out
    larger than with nearest-neighbour. The bench trains and tests on those masks, as the published figures do."""
    from lvit.data import SegmentationDataset, load_split

    records = load_split(monuseg, "test")[:1]
    official = SegmentationDataset(records, 224, mask_resize="official")[0]["mask"]
    nearest = SegmentationDataset(records, 224)[0]["mask"]
    assert official.shape == nearest.shape == (1, 224, 224)
    assert official.mean() > nearest.mean() * 1.05  # measured 1.10-1.13 on the test split


def test_side_by_side_processes_merge_results_and_render_a_gpu_section(tmp_path):
    """Three models trained by three processes share one runs folder: each merges only its own entry into
    results.json; --render-only then writes the named section (here a GPU one) and leaves the others alone."""
    runs = tmp_path / "runs"
    runs.mkdir()
    base = {"epochs": 3, "best_epoch": 2, "best_val_dice": 0.7, "stopped_early": False, "stopped_by_budget": True,
            "test_dice": 0.75, "test_iou": 0.6, "test_pooled_dice": 0.76, "n_test": 14, "lvit_test_dice": 0.74,
            "lvit_test_iou": 0.59, "train_seconds": 30.0, "machine": "test", "budget_minutes": 3.0,
            "gpu": "NVIDIA H200", "data_note": "a 224 px copy"}
    update_results_file(runs / "results.json", "unet", {**base, "test_dice": 0.70})
    stale_view = update_results_file(runs / "results.json", "lvit", base)  # a second process, same file
    assert set(stale_view) == {"unet", "lvit"} and stale_view["unet"]["test_dice"] == 0.70
    for m in ("lvit", "unet"):
        (runs / m).mkdir()
        (runs / m / "metrics.csv").write_text("epoch,val_dice,seconds\n1,0.5,10\n2,0.7,10\n3,0.65,10\n")

    md = tmp_path / "RESULTS.md"
    md.write_text(f"# results\n\n{bench.START}\nthe CPU table\n{bench.END}\n")
    rc = bench.main(["--render-only", "--runs", str(runs), "--section", "monuseg-gpu", "--results", str(md),
                     "--minutes", "3"])
    assert rc == 0
    text = md.read_text()
    assert "the CPU table" in text  # the CPU section is untouched
    assert text.count("<!-- monuseg-gpu:start -->") == 1 and "GPU: NVIDIA H200" in text
    assert "| LViT (text) (`lvit`) | 3 | 2 |" in text and "U-Net (`unet`)" in text and "a 224 px copy" in text
    assert (tmp_path / "monuseg_gpu_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.main(["--render-only", "--runs", str(tmp_path / "none"), "--results", str(md)]) == 2


def test_the_official_data_plugin_refuses_a_mirror_that_would_not_swap_the_report():
    from lvit.core.errors import ConfigError
    from lvit.presets import preset_path
    from lvit.train import load_config

    plugin = bench.official_data_plugin()
    config = load_config(preset_path("monuseg"), ["data.hflip_prob=0.5"])
    with pytest.raises(ConfigError, match="data.hflip_prob"):
        plugin.setup(config, None, None, None, False)
