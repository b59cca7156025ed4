"""bench/gpu/prepare.py: the 224 px copy made for the GPU machine must give training the same tensors as the
original files (images up to uint8 rounding, masks exactly, with the official mask resize)."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_a_pack_of_some_splits_unpacks_those_alone(tmp_path):
    """--qata-splits train,val (the test split scored where its original images are): only those records are
    packed, and the unpacked layout holds them and no test entries."""
    from lvit.data import generate_synthetic, load_split

    prep = load_gpu_prepare()
    src = Path(generate_synthetic(tmp_path / "src", n_train=3, n_val=2, n_test=2, size=48, seed=1, force=True,
                                  progress=False))
    manifest = prep.pack_qata(src, tmp_path / "pack" / "data", quality=0, workers=1, splits=("train", "val"))
    assert set(manifest["splits"]) == {"train", "val"}
    assert prep.unpack_qata(tmp_path / "pack", tmp_path / "out", workers=1) == {"n": 5, "problems": []}
    assert [r.name for r in load_split(tmp_path / "out", "val")] == [r.name for r in load_split(src, "val")]
    annotation = (tmp_path / "out" / "prompts" / "annotation.json").read_text()
    assert '"train"' in annotation and '"test"' not in annotation


def test_shipped_width_runs_come_back_whole_from_their_parts(tmp_path):
    """bench/gpu/qata_ship.sh cuts each run's tar into parts (the device returns files of at most 16 MiB);
    bench/gpu/qata_ship.py joins them in order and unpacks the run byte for byte."""
    import io
    import tarfile

    from files import load_bench

    ship = load_bench("bench/gpu/qata_ship.py", "bench_gpu_qata_ship")
    run = tmp_path / "made" / "w8-s0"
    (run / "checkpoints").mkdir(parents=True)
    weights = bytes(range(256)) * 400
    (run / "checkpoints" / "best.safetensors").write_bytes(weights)
    (run / "config.yaml").write_text("model_name: lvit\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(run, arcname="w8-s0")
    blob = buf.getvalue()
    returned = tmp_path / "returned"
    returned.mkdir()
    for i, start in enumerate(range(0, len(blob), 40000)):  # part-aa, part-ab, ... as split(1) names them
        (returned / f"w8-s0.tar.part-a{'abcdefgh'[i]}").write_bytes(blob[start:start + 40000])
    assert len(list(returned.iterdir())) > 2
    assert ship.unpack(returned, tmp_path / "work") == ["w8-s0"]
    assert (tmp_path / "work" / "w8-s0" / "checkpoints" / "best.safetensors").read_bytes() == weights
    (returned / "w8-s0.tar.part-ab").unlink()  # a missing middle part: the tar cannot be read whole
    with pytest.raises(tarfile.TarError):
        ship.unpack(returned, tmp_path / "work2")


def test_each_gpu_call_keeps_its_own_entry_and_row(tmp_path, monkeypatch):
    """bench/gpu/qata_ship.py: a second call's runs are named as the first's (by seed), so the JSON keeps one
    entry per call label, evaluating a label again replaces that entry alone, and the table shows every call."""
    from files import load_bench

    ship = load_bench("bench/gpu/qata_ship.py", "bench_gpu_qata_ship")
    monkeypatch.setattr(ship, "RESULTS_JSON", tmp_path / "qata_ship.json")
    monkeypatch.setattr(ship, "RESULTS_MD", tmp_path / "RESULTS.md")
    monkeypatch.setattr(ship, "shipped_line", lambda: "")

    def call(label, dice):
        test = {"dice_original": dice, "iou_original": dice - 0.1, "pooled_dice_original": dice + 0.05, "n_test": 3}
        run = {"run": "w8-s0", "seed": 0, "epochs": 2, "best_epoch": 2, "median_epoch_seconds": 1.0,
               "best_val_dice": 0.5, "val_dice_per_epoch": [0.4, 0.5], "base_channels": 8, "image_size": 64,
               "text_tokens": 24, "report_dropout": 0.25, "batch_size": 4, "lr": 1e-3, "t0": 2, "eta_min": 1e-4,
               "ema_decay": 0.999, "precision": "32-true", "compile": "none", "test_true_reports": test,
               "test_none_reports": {**test, "dice_original": dice - 0.05}}
        return {"call": label, "gpu": "G", "gpu_command": "bash x.sh", "test_command": "t", "test_machine": "m",
                "threshold": 0.5, "runs": [run]}

    ship.store_call(call("first", 0.81))
    ship.store_call(call("second", 0.83))
    ship.store_call(call("first", 0.82))  # the first call scored again
    assert [(c["call"], c["runs"][0]["test_true_reports"]["dice_original"]) for c in ship.read_calls()] == [
        ("first", 0.82), ("second", 0.83)]
    ship.render()
    table = [line for line in (tmp_path / "RESULTS.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| first", "| second"]
    assert "0.8200 / 0.7200" in table[1] and "0.8300 / 0.7300" in table[2]


def test_the_deadline_predicts_from_steady_epochs_and_waits_for_min_epochs(monkeypatch):
    """bench/gpu/qata_run.py's Deadline: it stops after the epoch whose successor (the median of the steady epochs,
    the first left out once others exist) would end past the deadline, never before ``min_epochs``."""
    from types import SimpleNamespace

    from files import load_bench

    run = load_bench("bench/gpu/qata_run.py", "bench_gpu_qata_run")
    clock = {"now": 0.0}
    monkeypatch.setattr(run.time, "time", lambda: clock["now"])

    def epochs(deadline, seconds):
        trainer = SimpleNamespace(should_stop=False)
        deadline.on_train_start(trainer, None)
        stopped_after = None
        for i, s in enumerate(seconds, start=1):
            clock["now"] += s
            deadline.on_train_epoch_end(trainer, None)
            if trainer.should_stop:
                stopped_after = i
                break
        return stopped_after

    clock["now"] = 0.0  # a 40 s first epoch, then 10 s ones, 75 s allowed: epochs end at 40, 50, 60, 70
    assert epochs(run.Deadline(75.0), [40, 10, 10, 10, 10]) == 1  # after one epoch only the first predicts
    clock["now"] = 0.0
    assert epochs(run.Deadline(75.0, min_epochs=3), [40, 10, 10, 10, 10]) == 4  # 70 + 10 > 75
    clock["now"] = 0.0
    assert epochs(run.Deadline(1000.0, min_epochs=3), [40, 10, 10]) is None
