"""Dice/IoU pinned end to end: fixed logits through ``lvit test`` and through ``validation_step``.

A stub network (no learning) returns pre-set logits per image, chosen so that every figure is a fraction
worked out by hand below. It is saved as a real run folder (``config.yaml`` + ``checkpoints/best.safetensors``
holding the logits table), so ``lvit test`` goes through ``load_run`` / ``Segmenter`` / ``run_test`` unchanged;
only ``build_model`` is pointed at the stub class. The same stub goes through the Lightning module's
``validation_step`` under a real ``Trainer.validate``.

Sizes: files are 64 x 64, the model works at 32 x 32. Everything is drawn in 2 x 2 blocks of the file, so

* the model-resolution ground truth (``nearest-exact`` resize, which samples pixel (2i+1, 2j+1) of each block)
  is exactly the 32 x 32 drawing, and a single file pixel at an (even, even) position is invisible to it;
* the prediction resized back (bilinear on logits of +-0.25, then the sigmoid at 0.5) is the 32 x 32 prediction
  with each pixel blown up to its 2 x 2 block: the nearest source pixel has weight 9/16 against 7/16 for the
  other three, so it alone sets the sign. Counts at the original size are 4x the model's, plus the extra pixels.

Logits are +-0.25 (probabilities 0.562 / 0.438): thresholding the logit instead of the probability at 0.5
would predict nothing at all.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

MODEL_SIZE, FILE_SIZE, LOGIT = 32, 64, 0.25

# Per image: grey value of the (constant) image file, which the stub reads back to pick its logits; ground truth
# and prediction at the model's 32 x 32 resolution; extra ground-truth pixels of the 64 x 64 file only.
CASES = {
    "case_a": {"grey": 10, "gt": [(4, 4), (4, 5), (5, 4), (5, 5)], "pred": [(4, 4), (4, 5), (5, 4)],
               "extra": [(20, 20)]},
    "case_b": {"grey": 20, "gt": [(10, 10), (10, 11), (11, 10), (11, 11)],
               "pred": [(10, 10), (10, 11), (11, 10), (11, 11), (20, 20), (20, 21), (21, 20), (21, 21)], "extra": []},
    "case_c": {"grey": 30, "gt": [], "pred": [], "extra": []},  # both empty
    "case_d": {"grey": 40, "gt": [], "pred": [(0, 0), (31, 31)], "extra": []},  # false alarm only (corners)
    "case_e": {"grey": 50, "gt": [(15, 15), (15, 16), (16, 15), (16, 16)], "pred": [], "extra": []},  # missed
    "case_f": {"grey": 60, "gt": [], "pred": [], "extra": [(40, 2)]},  # empty at 32 px, one pixel in the file
}

# Hand-computed per image: Dice = 2tp / (2tp + fp + fn), IoU = tp / (tp + fp + fn); both empty -> 1, one -> 0.
#            model resolution (32 px)          original resolution (64 px: counts x4 + extra pixels)
# case_a:    tp 3, fn 1: 6/7, 3/4              tp 12, fn 4 + 1: 24/29, 12/17
# case_b:    tp 4, fp 4: 8/12 = 2/3, 1/2       tp 16, fp 16: 2/3, 1/2
# case_c:    both empty: 1, 1                  both empty: 1, 1
# case_d:    fp 2: 0, 0                        fp 8: 0, 0
# case_e:    fn 4: 0, 0                        fn 16: 0, 0
# case_f:    both empty: 1, 1                  fn 1: 0, 0
MODEL = {"case_a": (6 / 7, 3 / 4), "case_b": (2 / 3, 1 / 2), "case_c": (1.0, 1.0), "case_d": (0.0, 0.0),
         "case_e": (0.0, 0.0), "case_f": (1.0, 1.0)}
ORIGINAL = {"case_a": (24 / 29, 12 / 17), "case_b": (2 / 3, 1 / 2), "case_c": (1.0, 1.0), "case_d": (0.0, 0.0),
            "case_e": (0.0, 0.0), "case_f": (0.0, 0.0)}
GT_PIXELS = {"case_a": 17, "case_b": 16, "case_c": 0, "case_d": 0, "case_e": 16, "case_f": 1}  # in the file
PRED_PIXELS = {"case_a": 12, "case_b": 32, "case_c": 0, "case_d": 8, "case_e": 0, "case_f": 0}  # at 64 px
# Means over the six images and pooled counts:
MODEL_MEAN = (37 / 63, 13 / 24)  # (6/7 + 2/3 + 1 + 0 + 0 + 1) / 6 = (18 + 14 + 42) / 126; (3/4 + 1/2 + 2) / 6
MODEL_POOLED = (14 / 25, 7 / 18)  # tp 7, fp 4 + 2 = 6, fn 1 + 4 = 5
ORIGINAL_MEAN = ((24 / 29 + 2 / 3 + 1) / 6, (12 / 17 + 1 / 2 + 1) / 6)
ORIGINAL_POOLED = (56 / 102, 28 / 74)  # tp 28, fp 16 + 8 = 24, fn 5 + 16 + 1 = 22


class KeyedLogits(nn.Module):
    """Stub network: returns the stored logits ``table[k]`` of the image whose grey value is ``keys[k]``."""

    def __init__(self, n: int = len(CASES)):
        super().__init__()
        self.register_buffer("keys", torch.zeros(n))
        self.register_buffer("table", torch.zeros(n, 1, MODEL_SIZE, MODEL_SIZE))

    def forward(self, image, text=None, text_mask=None):
        grey = (image.mean(dim=(1, 2, 3)) * 255).round()  # [B]; a constant image stays constant when resized
        hit = grey[:, None] == self.keys[None, :]  # [B, n]
        assert bool(hit.any(1).all()), f"stub got an image it has no logits for: {grey.tolist()}"
        return self.table[hit.float().argmax(1)]


def _exact(pair):
    """Float64 means of six fractions: equal up to rounding."""
    return pytest.approx(pair, abs=1e-12)


def _blocks(pixels, size: int = MODEL_SIZE) -> np.ndarray:
    """32 x 32 drawing -> 64 x 64 array with every pixel as a 2 x 2 block."""
    small = np.zeros((size, size), np.uint8)
    for r, c in pixels:
        small[r, c] = 1
    return np.kron(small, np.ones((2, 2), np.uint8))


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    """(dataset root, run folder) with the six cases in the official layout and the stub's logits as weights."""
    base = tmp_path_factory.mktemp("pinned")
    folder = base / "data" / "Test_Folder"
    (folder / "img").mkdir(parents=True)
    (folder / "labelcol").mkdir()
    rows = ["Image,Description"]
    stub = KeyedLogits()
    for k, (name, case) in enumerate(CASES.items()):
        Image.fromarray(np.full((FILE_SIZE, FILE_SIZE), case["grey"], np.uint8)).save(folder / "img" / f"{name}.png")
        gt = _blocks(case["gt"])
        for r, c in case["extra"]:
            assert r % 2 == 0 and c % 2 == 0 and gt[r, c] == 0  # invisible to the 32 px ground truth
            gt[r, c] = 1
        Image.fromarray(gt * 255).save(folder / "labelcol" / f"mask_{name}.png")
        rows.append(f"mask_{name}.png,Left lung: case {name}.")
        stub.keys[k] = case["grey"]
        logits = torch.full((MODEL_SIZE, MODEL_SIZE), -LOGIT)
        for r, c in case["pred"]:
            logits[r, c] = LOGIT
        stub.table[k, 0] = logits
    (folder / "Test_text.csv").write_text("\n".join(rows) + "\n")

    run = base / "run"
    (run / "checkpoints").mkdir(parents=True)
    # model_name unet: a text-free model, so no text encoder is built for the stub.
    (run / "config.yaml").write_text(
        f"model_name: unet\nmodel:\n  image_size: {MODEL_SIZE}\n  in_channels: 1\n  base_channels: 8\n")
    save_file(stub.state_dict(), str(run / "checkpoints" / "best.safetensors"))
    return base / "data", run


@pytest.fixture
def stub_builds(monkeypatch):
    """``build_model`` (which ``load_run`` calls for the run's network) returns the stub."""
    import lvit.artifacts.runs
    import lvit.models

    def build(name, config):
        assert name == "unet" and config.image_size == MODEL_SIZE and config.in_channels == 1
        return KeyedLogits()

    monkeypatch.setattr(lvit.models, "build_model", build)
    monkeypatch.setattr(lvit.artifacts.runs, "build_model", build, raising=False)


def test_lvit_test_metrics_are_the_hand_computed_fractions(pinned, stub_builds, tmp_path, capsys):
    from lvit.commands.cli import main

    data, run = pinned
    out = tmp_path / "out"
    assert main(["test", str(run), "--data", str(data), "--out", str(out), "--k", "1", "--batch-size", "4",
                 "--no-progress"]) == 0
    capsys.readouterr()

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == metrics["n_scored"] == 6 and metrics["threshold"] == 0.5
    model, original = metrics["model_resolution"], metrics["original_resolution"]
    assert model["image_size"] == MODEL_SIZE
    assert (model["mean_over_images"]["dice"], model["mean_over_images"]["iou"]) == _exact(MODEL_MEAN)
    assert (model["dataset_level"]["dice"], model["dataset_level"]["iou"]) == _exact(MODEL_POOLED)
    assert (original["mean_over_images"]["dice"], original["mean_over_images"]["iou"]) == _exact(ORIGINAL_MEAN)
    assert (original["dataset_level"]["dice"], original["dataset_level"]["iou"]) == _exact(ORIGINAL_POOLED)
    assert (metrics["dice"], metrics["iou"]) == _exact(MODEL_MEAN)  # the paper's figure

    with open(out / "per_image.csv", newline="") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert sorted(rows) == [f"{name}.png" for name in CASES]
    for name in CASES:
        row = rows[f"{name}.png"]
        got = [float(row[k]) for k in ("dice", "iou", "dice_original", "iou_original")]
        assert got == pytest.approx([*MODEL[name], *ORIGINAL[name]], abs=1e-6), name  # written with 6 decimals
        assert int(row["gt_pixels"]) == GT_PIXELS[name] and int(row["pred_pixels"]) == PRED_PIXELS[name], name
        # The saved mask is the prediction at the file's size: the 32 px prediction in 2 x 2 blocks.
        saved = np.array(Image.open(out / row["mask_file"]))
        assert saved.shape == (FILE_SIZE, FILE_SIZE)
        assert np.array_equal(saved > 127, _blocks(CASES[name]["pred"]).astype(bool)), name

    # k = 1: the best image by original-resolution Dice is case_c (the only 1.0), the worst the first 0.0 by name.
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert overlays == ["best_1_case_c_dice1.000.png", "worst_1_case_d_dice0.000.png"]


def test_validation_step_logs_the_hand_computed_mean_over_images(pinned):
    """val_dice / val_iou are the mean of per-image figures at the model's resolution: 37/63 and 13/24. Batches
    of 4 + 2 images: a mean of batch means would give ((6/7 + 2/3 + 1 + 0) / 4 + (0 + 1) / 2) / 2 = 0.5655."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lvit.data import SegmentationDataset, load_split
    from lvit.train import load_config
    from lvit.train.module import SegmentationModule

    data, run = pinned
    stub = KeyedLogits()
    from safetensors.torch import load_file

    stub.load_state_dict(load_file(str(run / "checkpoints" / "best.safetensors")))
    records = load_split(data, "test")
    loader = DataLoader(SegmentationDataset(records, MODEL_SIZE, in_channels=1), batch_size=4, shuffle=False)
    module = SegmentationModule(stub, load_config(None, ["trainer.progress=false"]))
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    (logged,) = trainer.validate(module, dataloaders=loader, verbose=False)
    assert logged["val_dice"] == pytest.approx(MODEL_MEAN[0], abs=1e-6)
    assert logged["val_iou"] == pytest.approx(MODEL_MEAN[1], abs=1e-6)
    assert module.val_results["val_dice"] == pytest.approx(MODEL_MEAN[0], abs=1e-6)
    assert module.val_results["val_iou"] == pytest.approx(MODEL_MEAN[1], abs=1e-6)
