"""lvit test / lvit predict on a tiny trained run: outputs exist, masks have the original image size."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from files import train_tiny_lvit
from PIL import Image

from lvit.commands.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset root with 64 px images, run folder of a 1-epoch LViT working at 32 px)."""
    return train_tiny_lvit(tmp_path_factory.mktemp("predict"), seed=1)


def test_lvit_test_writes_metrics_masks_and_overlays(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    out = tmp_path / "test"
    assert main(["test", str(run), "--data", str(data), "--out", str(out), "--k", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "mean over images" in printed and "overlays" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == metrics["n_scored"] == 3
    for res in ("model_resolution", "original_resolution"):
        for kind in ("mean_over_images", "dataset_level"):
            assert 0.0 <= metrics[res][kind]["dice"] <= 1.0 and 0.0 <= metrics[res][kind]["iou"] <= 1.0
    assert metrics["model_resolution"]["image_size"] == 32
    assert metrics["dice"] == metrics["model_resolution"]["mean_over_images"]["dice"]
    with open(out / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    for row in rows:
        # Masks are written at the image's original size (64 px), not the model's 32 px.
        assert Image.open(out / row["mask_file"]).size == (64, 64)
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(overlays) == 2 and overlays[0].startswith("best_1_") and overlays[1].startswith("worst_1_")
    assert Image.open(out / "overlays" / overlays[0]).size == (64, 64)
    # A second run into the same folder is refused without --force.
    assert main(["test", str(run), "--data", str(data), "--out", str(out), "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err


def test_predict_one_image_of_any_size(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    rng = np.random.default_rng(0)
    image = tmp_path / "odd.png"
    Image.fromarray(rng.integers(0, 255, (45, 70), dtype=np.uint8)).save(image)  # grey, 70 x 45
    out, prob, ov = tmp_path / "mask.png", tmp_path / "prob.png", tmp_path / "ov.png"
    args = ["predict", str(run), "--image", str(image), "--text", "Left lung: one infected area in the lower zone.",
            "--out", str(out), "--prob", str(prob), "--overlay", str(ov)]
    assert main(args) == 0
    for path in (out, prob, ov):
        assert Image.open(path).size == (70, 45)
    assert set(np.unique(np.array(Image.open(out)))) <= {0, 255}
    assert main(args) == 2  # outputs exist: refused without --force
    assert "--force" in capsys.readouterr().err
    # A text-guided model without a report: one-line error.
    assert main(["predict", str(run), "--image", str(image), "--out", str(tmp_path / "m2.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--text" in err and "\n" not in err


def test_predict_folder_with_report_table(tiny_run, tmp_path):
    data, run = tiny_run
    folder = data / "Test_Folder" / "img"
    names = sorted(p.name for p in folder.iterdir())
    table = tmp_path / "reports.csv"
    table.write_text("Image,Description\n" + "".join(f"{n},Right lung: one infected area in the upper zone.\n"
                                                     for n in names))
    out = tmp_path / "pred"
    assert main(["predict", str(run), "--images", str(folder), "--reports", str(table), "--out", str(out),
                 "--prob", "--overlay"]) == 0
    for sub in ("masks", "probs", "overlays"):
        assert sorted(p.name for p in (out / sub).iterdir()) == [Path(n).stem + ".png" for n in names]
