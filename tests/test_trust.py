"""Runs, folders and masks a user can trust: weights that are not numbers, absurd model sizes, a non-finite
probability map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvit.commands.cli import main
from lvit.core.errors import CheckpointError, LvitError
from lvit.models import LViTConfig, build_model


def _one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err
    return err


@pytest.fixture()
def folder(tmp_path) -> Path:
    """A tiny LViT-T model folder (no text) and an image for it."""
    model = build_model("lvit-t", LViTConfig(image_size=32, base_channels=8, vit_heads=2))
    out = model.save_pretrained(tmp_path / "model")
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(tmp_path / "x.png")
    return out


def _poison(path: Path, value: float) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim > 1)
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, str(path))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_by_predict_and_export(folder, tmp_path, capsys, value):
    _poison(folder / "model.safetensors", value)
    assert main(["predict", str(folder), "--image", str(tmp_path / "x.png"), "--out", str(tmp_path / "m.png")]) == 2
    _one_line_error(capsys, "NaN or infinity")
    assert not (tmp_path / "m.png").exists()
    assert main(["export", str(folder), "--hf", str(tmp_path / "copy")]) == 2
    _one_line_error(capsys, "NaN or infinity")
    assert not (tmp_path / "copy").exists()


def test_non_finite_weights_of_a_run_folder_are_refused(tmp_path):
    from lvit.artifacts.runs import load_run, save_weights

    model = build_model("lvit-t", LViTConfig(image_size=32, base_channels=8, vit_heads=2))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(json.dumps({"model_name": "lvit-t", "model": model.config.to_dict()}))
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    save_weights(run / "checkpoints" / "best.safetensors", model)
    with pytest.raises(CheckpointError, match="head.weight"):
        load_run(run)


@pytest.mark.parametrize("field, value", [("base_channels", 1_000_000_000), ("vit_depth", 1_000_000)])
def test_absurd_sizes_in_config_json_are_one_line_naming_the_field(folder, tmp_path, capsys, field, value):
    config = json.loads((folder / "config.json").read_text())
    config["model"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["predict", str(folder), "--image", str(tmp_path / "x.png"), "--out", str(tmp_path / "m.png")]) == 2
    _one_line_error(capsys, f"{field} must be at most")


def test_a_non_finite_probability_map_is_an_error_not_a_mask(folder, tmp_path):
    from lvit.inference import Segmenter

    segmenter = Segmenter(folder)
    image = np.full((40, 40, 3), 90, np.uint8)
    assert np.isfinite(segmenter.predict(image)).all()
    with torch.no_grad():  # finite weights that overflow: the logits become infinite
        segmenter.model.head.weight.fill_(3e38)
        segmenter.model.head.bias.fill_(3e38)
    with pytest.raises(LvitError, match="NaN or infinite"):
        segmenter.predict(image)


# --- masks saved with another label value -----------------------------------------------------------------------


@pytest.mark.parametrize("label", [127, 38, 2, 1, 255])
def test_two_valued_masks_are_read_at_their_label_value(tmp_path, label):
    from lvit.data import read_mask
    from lvit.data.describe import describe_file

    mask = np.zeros((224, 224), np.uint8)
    mask[160:200, 20:80] = label  # the lower part of the image's left side
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").sum() == 40 * 60
    assert describe_file(tmp_path / "m.png") == "unilateral pulmonary infection, one infected area, lower left lung."


def test_soft_masks_keep_the_127_rule_and_an_emptied_mask_is_warned_about(tmp_path, capsys):
    from lvit.data import load_pair
    from lvit.data.records import Record

    soft = np.zeros((64, 64), np.uint8)
    soft[10:20, 10:20] = 200
    soft[30:40, 30:40] = 100  # below 127: background under the soft-mask rule
    soft[50, 50] = 20
    Image.fromarray(soft).save(tmp_path / "soft.png")
    faint = np.zeros((64, 64), np.uint8)
    faint[10:20, 10:20] = 90
    faint[30:40, 30:40] = 60
    Image.fromarray(faint).save(tmp_path / "faint.png")
    Image.fromarray(np.full((64, 64), 80, np.uint8)).save(tmp_path / "x.png")
    _, mask = load_pair(Record("x.png", tmp_path / "x.png", tmp_path / "soft.png", "r"))
    assert mask.sum() == 100 and capsys.readouterr().err == ""
    _, mask = load_pair(Record("x.png", tmp_path / "x.png", tmp_path / "faint.png", "r"))
    err = capsys.readouterr().err
    assert mask.sum() == 0 and "faint.png" in err and "read as an empty mask" in err and err.count("\n") == 1


# --- run folders: what a resume may change, and on which data --------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """(data, another dataset, a finished 1-epoch run)."""
    from lvit.data.synthetic import generate_synthetic
    from lvit.presets import preset_path
    from lvit.train import load_config
    from lvit.train.runner import train

    base = tmp_path_factory.mktemp("resume")
    data = generate_synthetic(base / "data", n_train=6, n_val=2, n_test=2, size=64, seed=0, progress=False)
    other = generate_synthetic(base / "other", n_train=6, n_val=2, n_test=2, size=64, seed=5, progress=False)
    train(load_config(preset_path("synth"), ["model.image_size=32", "model.base_channels=8", "data.batch_size=3",
                                             "trainer.max_epochs=1", "trainer.progress=false",
                                             "data.num_workers=0"]), data, base / "run")
    return data, other, base / "run"


@pytest.mark.parametrize("change", ["model.base_channels=32", "optim.lr=0.5", "data.batch_size=2"])
def test_a_resume_that_would_change_what_the_run_learns_is_refused_and_touches_nothing(short_run, tmp_path, capsys,
                                                                                       change):
    import shutil

    _, _, source = short_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    before = _tree(run)
    assert main(["train", "--out", str(run), "--resume", "--set", change, "--no-progress"]) == 2
    _one_line_error(capsys, f"cannot change {change.split('=')[0]}")
    assert _tree(run) == before  # byte for byte


def test_a_resume_may_train_longer_and_says_when_the_data_changed(short_run, tmp_path, capsys):
    import shutil

    import yaml

    data, other, source = short_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert "other data" not in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--data", str(other), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "resumed on other data" in err and str(other.resolve()) in err
    info = yaml.safe_load((run / "config.yaml").read_text())["data_info"]
    assert info["root"] == str(other.resolve()) and info["earlier"][0]["root"] == str(data.resolve())


def test_a_resume_says_when_its_loading_or_threads_change_the_draws_or_the_rounding(short_run, capsys):
    from types import SimpleNamespace

    from lvit.artifacts.runs import load_state_file
    from lvit.train.callbacks import RunCheckpoint
    from lvit.train.runner import resume_config

    _, _, run = short_run  # trained with data.num_workers=0, one torch thread
    for workers, warned in ((0, False), (2, True)):
        config, _ = resume_config(run, [f"data.num_workers={workers}"])
        err = capsys.readouterr().err
        assert config.data.num_workers == workers and ("data.num_workers 0 -> 2" in err) == warned, err
    state = load_state_file(run / "checkpoints" / "last.ckpt")["callbacks"]["RunCheckpoint"]
    threads = torch.get_num_threads()
    assert state["torch_threads"] == threads
    trainer, module = SimpleNamespace(is_global_zero=True), SimpleNamespace(device=torch.device("cpu"))
    for before, warned in ((threads, False), (threads + 1, True)):
        callback = RunCheckpoint(run)
        callback.load_state_dict({**state, "rng": None, "torch_threads": before})  # rng None: keep this stream
        callback.on_train_start(trainer, module)
        err = capsys.readouterr().err
        assert (f"resumed with {threads} torch thread(s), trained so far with {before}" in err) == warned, err


def test_a_run_folder_in_use_is_locked_and_a_stale_lock_is_reported(short_run, tmp_path, capsys):
    import json
    import shutil
    import socket
    import subprocess
    import sys

    from lvit.artifacts.runs import LOCK_NAME

    data, _, source = short_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        before = _tree(run)
        for argv in (["--resume", "--epochs", "2"], ["--config", "synth", "--data", str(data), "--force"]):
            assert main(["train", "--out", str(run), *argv, "--no-progress"]) == 2
            _one_line_error(capsys, f"in use by lvit train (pid {holder.pid}")
            assert _tree(run) == before
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale, reported and taken over; the lock goes when the training ends.
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert f"the lock of pid {holder.pid}" in capsys.readouterr().err
    assert not (run / LOCK_NAME).exists()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-machine", "since": "then"}))
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 2
    _one_line_error(capsys, "host another-machine")


def test_export_keeps_the_run_s_report_writer_and_predict_uses_it(short_run, tmp_path, capsys):
    import shutil

    from lvit.data import load_split
    from lvit.models.reporter import ReporterConfig
    from lvit.train.reporter import ReporterTraining, train_reporter

    data, _, source = short_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    train_reporter(data, run / "reporter", model_config=ReporterConfig(image_size=32, width=4, pool_grid=2, hidden=8,
                                                                       mask_head=False),
                   training=ReporterTraining(epochs=1, batch_size=4), progress=False, log=None)
    assert main(["export", str(run), "--hf", str(tmp_path / "folder")]) == 0
    assert sorted(p.name for p in (tmp_path / "folder" / "reporter").iterdir()) == ["reporter.json",
                                                                                    "weights.safetensors"]
    capsys.readouterr()
    image = load_split(data, "test")[0].image_path
    assert main(["predict", str(tmp_path / "folder"), "--image", str(image), "--out", str(tmp_path / "m.png")]) == 0
    assert "generated from the image by the report writer" in capsys.readouterr().out
    assert (tmp_path / "m.report.txt").is_file()
    (tmp_path / "folder" / "reporter" / "notes.txt").write_text("x")  # anything else in reporter/ is refused
    assert main(["predict", str(tmp_path / "folder"), "--image", str(image), "--out", str(tmp_path / "n.png")]) == 2
    _one_line_error(capsys, "reporter/ must hold exactly")


# --- reports far from the training reports ----------------------------------------------------------------------


def test_reports_far_from_the_training_reports_are_flagged_reworded_ones_are_not():
    from files import load_bench

    from lvit.text.vocabulary import ReportCheck, report_words

    rephrase = load_bench("bench/rephrase_reports.py", "rephrase_reports")
    templates = ["bilateral pulmonary infection, six infected areas, upper middle lower left lung and upper middle "
                 "lower right lung.", "unilateral pulmonary infection, one infected area, lower right lung.",
                 "bilateral pulmonary infection, three infected areas, middle lower left lung and lower right lung.",
                 "unilateral pulmonary infection, two infected areas, middle lower left lung."]
    known = set().union(*(report_words(t) for t in templates))

    def check(text: str) -> ReportCheck:
        words = report_words(text)
        return ReportCheck(0, 0, len(words), len(words & known))

    reworded, _ = rephrase.rephrase_all(templates * 30, seed=1)
    assert not any(check(t).unfamiliar for t in templates + reworded)
    for far in ("Opacité bilatérale des deux poumons", "😀😀", "left", "The patient feels fine today and went home",
                "infección pulmonar bilateral, dos áreas infectadas, pulmón izquierdo inferior"):
        assert check(far).unfamiliar, far


# --- derived files that would describe something else ------------------------------------------------------------


def test_export_leaves_out_test_metrics_of_other_weights(short_run, tmp_path, capsys):
    import shutil

    from lvit.artifacts.runs import load_run, save_weights

    data, _, source = short_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    assert main(["test", str(run), "--data", str(data), "--no-progress", "--k", "0"]) == 0
    metrics = json.loads((run / "test-test" / "metrics.json").read_text())
    assert len(metrics["weights_sha256"]) == 64
    assert main(["export", str(run), "--hf", str(tmp_path / "same")]) == 0
    assert json.loads((tmp_path / "same" / "config.json").read_text())["metrics"]["test"]  # measured: kept
    loaded = load_run(run)
    with torch.no_grad():
        loaded.model.head.bias.add_(1.0)  # the run trained on: its best weights are no longer those tested
    save_weights(run / "checkpoints" / "best.safetensors", loaded.model)
    capsys.readouterr()
    assert main(["export", str(run), "--hf", str(tmp_path / "other")]) == 0
    assert "computed with other weights" in capsys.readouterr().err
    assert json.loads((tmp_path / "other" / "config.json").read_text())["metrics"]["test"] == []
    assert "No test metrics" in (tmp_path / "other" / "README.md").read_text()


def test_a_forced_predict_leaves_no_report_of_an_earlier_mask(tmp_path, capsys):
    model = build_model("lvit-t", LViTConfig(image_size=32, base_channels=8, vit_heads=2))
    folder = model.save_pretrained(tmp_path / "model")
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "m.report.txt").write_text("a report generated for the earlier mask\n")
    assert main(["predict", str(folder), "--image", str(tmp_path / "x.png"), "--out", str(tmp_path / "m.png")]) == 0
    assert not (tmp_path / "m.report.txt").exists()
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(images / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "reports.csv").write_text("image,report,source\nold.png,x,y\n")
    (out / "skipped.csv").write_text("image,status,reason\nold.png,skipped,x\n")
    assert main(["predict", str(folder), "--images", str(images), "--out", str(out), "--force", "--no-progress"]) == 0
    assert not (out / "reports.csv").exists() and not (out / "skipped.csv").exists()
    assert (out / "masks" / "a.png").is_file()


def test_a_report_writer_no_better_than_the_most_frequent_report_is_warned_about(short_run, tmp_path, capsys):
    import shutil

    import pandas as pd

    from lvit.models.reporter import ReporterConfig
    from lvit.train.reporter import ReporterTraining, train_reporter

    tiny = ReporterConfig(image_size=32, width=4, pool_grid=2, hidden=8, mask_head=False)
    data, _, _ = short_run
    one_epoch = ReporterTraining(epochs=1, batch_size=4)
    meta = train_reporter(data, tmp_path / "writer", model_config=tiny, training=one_epoch, progress=False, log=None)
    floor = meta["val"]["most_frequent_report"]
    assert 0.0 <= floor["exact"] <= 1.0 and floor["train_count"] >= 1
    beats = meta["val"]["thresholds_chosen"]["exact"] > floor["exact"]
    assert meta["val"]["beats_most_frequent_report"] is beats
    assert json.loads((tmp_path / "writer" / "reporter.json").read_text())["val"] == json.loads(json.dumps(meta["val"]))
    assert ("no better than" in capsys.readouterr().err) is (not beats)
    # Every report the same: always writing it is exact, so no writer can beat it: warned and recorded.
    same = tmp_path / "same"
    shutil.copytree(data, same)
    for table in same.glob("*/*_text.xlsx"):
        frame = pd.read_excel(table)
        frame["Description"] = "unilateral pulmonary infection, one infected area, lower left lung."
        frame.to_excel(table, index=False)
    meta = train_reporter(same, tmp_path / "writer2", model_config=tiny, training=one_epoch, progress=False, log=None)
    assert meta["val"]["most_frequent_report"]["exact"] == 1.0 and meta["val"]["beats_most_frequent_report"] is False
    err = capsys.readouterr().err
    assert "no better than always writing the most frequent training report" in err and err.count("\n") == 1
