"""bench/qata.py renders its RESULTS.md sections from the raw results file alone."""

from __future__ import annotations

import json

import torch
from files import load_bench


def _entry(row, seed, dice, pseudo=None, branched=False):
    entry = {"row": row, "seed": seed, "model": "lvit", "image_size": 128, "base_channels": 16, "n_test": 2113,
             "dice": dice, "iou": dice - 0.1, "pooled_dice": dice + 0.05, "pooled_iou": dice - 0.05,
             "params": 1_000_000, "epochs": 10, "best_epoch": 10, "train_minutes": 60.0, "machine": "test machine",
             "val_dice_per_epoch": [dice - 0.01 * (10 - i) for i in range(10)]}
    if pseudo is not None:
        entry["pseudo_dice_per_epoch"] = pseudo
    if branched:
        entry["branched_from"] = {"run": f"lvit-25-steps-s{seed}", "after_epoch": 5}
    return entry


def test_semi_section_from_raw_results(tmp_path):
    qata = load_bench("bench/qata.py", "bench_qata")
    warmup = [None] * 10
    with_pseudo = [None] * 5 + [0.70, 0.71, 0.72, 0.73, 0.74]
    results = {
        "lvit-s0": _entry("lvit", 0, 0.82), "lvit-s1": _entry("lvit", 1, 0.84),
        "lvit-25-steps-s0": _entry("lvit-25-steps", 0, 0.76, warmup),
        "lvit-25-steps-s1": _entry("lvit-25-steps", 1, 0.78, warmup),
        "lvit-25-epi+lv-s0": _entry("lvit-25-epi+lv", 0, 0.79, with_pseudo, branched=True),
        "lvit-25-epi+lv-s1": _entry("lvit-25-epi+lv", 1, 0.81, with_pseudo, branched=True),
    }
    del results["lvit-s1"]["val_dice_per_epoch"]  # evaluated before the curves were recorded: left out of them
    raw, md = tmp_path / "qata_results.json", tmp_path / "RESULTS.md"
    raw.write_text(json.dumps(results))
    md.write_text("# Results\n")
    text = qata.render_results(raw, md)
    written = md.read_text()
    assert "<!-- qata-semi:start -->" in written and "<!-- qata:start -->" in written
    lines = text.splitlines()
    # The supervised table leaves the semi rows to their own section.
    supervised = lines[:lines.index(next(line for line in lines if line.startswith("## Semi-supervised")))]
    assert not any("lvit-25" in line or "25% of the masks" in line for line in supervised if line.startswith("|"))
    row = next(line for line in lines if line.startswith("| 25% + EPI + LV loss"))
    assert "| 0, 1 | 0.8000 (0.7900-0.8100) |" in row and "| 0.7400 (0.7400-0.7400) | 10, 10 | 80.95 |" in row
    # (0.80 - 0.77) / (0.83 - 0.77) of the gap closed.
    assert "25% + EPI + LV loss: 50%" in text
    assert "- lvit-25-epi+lv-s1, epochs 6-10: 0.700, 0.710, 0.720, 0.730, 0.740" in text
    assert "- lvit-25-steps-s0" not in text  # no pseudo labels, no line
    assert (tmp_path / "qata_semi_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Validation Dice and pseudo-label Dice per epoch](qata_semi_curves.png)" in text
    assert "Branched runs: lvit-25-epi+lv-s0 (after epoch 5), lvit-25-epi+lv-s1 (after epoch 5)." in text
    assert "trained again" not in text  # every branched run shares its machine with the run it branched from


def test_semi_section_says_when_the_run_a_branch_continued_was_trained_again_elsewhere(tmp_path):
    qata = load_bench("bench/qata.py", "bench_qata")
    with_pseudo = [None] * 5 + [0.70, 0.71, 0.72, 0.73, 0.74]
    results = {"lvit-s0": _entry("lvit", 0, 0.82),
               "lvit-25-steps-s0": {**_entry("lvit-25-steps", 0, 0.76, [None] * 10), "machine": "machine B"},
               "lvit-25-steps-s1": _entry("lvit-25-steps", 1, 0.78, [None] * 10),
               "lvit-25-epi-s0": _entry("lvit-25-epi", 0, 0.79, with_pseudo, branched=True),
               "lvit-25-epi+lv-s0": _entry("lvit-25-epi+lv", 0, 0.79, with_pseudo, branched=True),
               "lvit-25-epi+lv-s1": _entry("lvit-25-epi+lv", 1, 0.81, with_pseudo, branched=True)}
    raw, md = tmp_path / "qata_results.json", tmp_path / "RESULTS.md"
    raw.write_text(json.dumps(results))
    md.write_text("# Results\n")
    text = qata.render_results(raw, md)
    assert ("lvit-25-epi+lv-s0, lvit-25-epi-s0: measured on test machine; they branched from a copy of "
            "lvit-25-steps-s0 trained there, while the lvit-25-steps-s0 in this table was trained again on machine B"
            in text)
    assert "lvit-25-epi+lv-s1: measured" not in text  # seed 1 branched from the run the table holds


def test_evaluate_refreshes_training_facts_of_evaluated_runs_without_testing_again(tmp_path):
    """An entry evaluated before a training figure was recorded gets it from the run folder; the test figures
    stay as they were (nothing is tested again), and the curves skip entries that still lack it."""
    qata = load_bench("bench/qata.py", "bench_qata")
    run = tmp_path / "work" / "runs" / "lvit-s0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.safetensors").write_bytes(b"")
    (run / "config.yaml").write_text("model_name: lvit\ntrainer:\n  max_epochs: 2\n")
    (run / "metrics.csv").write_text("epoch,val_dice,seconds\n1,0.5,60\n2,0.7,60\n")
    torch.save({"global_step": 1430, "epoch": 1}, run / "checkpoints" / "last.ckpt")
    old = _entry("lvit", 0, 0.82)
    del old["val_dice_per_epoch"]
    raw = tmp_path / "qata_results.json"
    raw.write_text(json.dumps({"lvit-s0": old, "lvit-25-steps-s0": _entry("lvit-25-steps", 0, 0.76, [None] * 10)}))
    rc = qata.main(["evaluate", "--data", str(tmp_path / "no-data"), "--work", str(tmp_path / "work"),
                    "--results", str(raw), "--results-md", str(tmp_path / "RESULTS.md"), "--threads", "1"])
    assert rc == 0
    entry = json.loads(raw.read_text())["lvit-s0"]
    assert entry["val_dice_per_epoch"] == [0.5, 0.7] and entry["best_epoch"] == 2 and entry["train_minutes"] == 2.0
    assert entry["steps"] == 1430 and entry["epoch_seconds"] == [60.0, 60.0]
    assert entry["dice"] == 0.82  # not tested again


def test_every_row_is_a_valid_configuration_of_the_preset():
    """A row's overrides are checked when its run starts, hours into a session's plan: check them all here."""
    from lvit.presets import preset_path
    from lvit.train import load_config

    qata = load_bench("bench/qata.py", "qata")
    for row, (model, overrides) in qata.ROWS.items():
        config = load_config(preset_path(qata.PRESET), [f"model_name={model}", *overrides])
        assert config.model_name == model, row
    flip = load_config(preset_path(qata.PRESET), qata.ROWS["lvit-hflip"][1])
    assert flip.data.hflip_prob == 0.5 and flip.data.augment


def test_supervised_table_says_each_rows_input_size_and_compares_them_at_224(tmp_path):
    qata = load_bench("bench/qata.py", "bench_qata")
    results = {"lvit-s0": {**_entry("lvit", 0, 0.82), "dice_original": 0.8211},
               "lvit-rd25-160-s0": {**_entry("lvit-rd25-160", 0, 0.83), "image_size": 160, "dice_original": 0.8333},
               "unet-s0": _entry("unet", 0, 0.77)}  # evaluated before the 224 px figure was recorded
    raw, md = tmp_path / "qata_results.json", tmp_path / "RESULTS.md"
    raw.write_text(json.dumps(results))
    md.write_text("# Results\n")
    lines = qata.render_results(raw, md).splitlines()
    row_128 = next(x for x in lines if x.startswith("| LViT (24"))
    assert row_128.startswith("| LViT (24 tokens: whole report) | 128 | 0 | 0.8200 |")
    row_160 = next(x for x in lines if x.startswith("| LViT, report dropout 0.25, 160 px"))
    assert row_160.startswith("| LViT, report dropout 0.25, 160 px input (true reports) | 160 | 0 | 0.8300 |")
    assert "| 0.8333 | 1.00M |" in row_160
    assert "| 0.7200 | - | 1.00M |" in next(x for x in lines if x.startswith("| U-Net"))
