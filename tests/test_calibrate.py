"""lvit calibrate: a threshold chosen on validation images, kept with the weights, used by test/predict/export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from files import train_tiny_lvit
from PIL import Image

from lvit.commands.cli import main
from lvit.evaluate.threshold import CANDIDATES, choose, dice_per_threshold


def test_dice_at_each_threshold_by_hand():
    prob = np.array([[0.2, 0.45, 0.6, 0.9]])
    truth = np.array([[False, True, True, False]])
    # >= 0.4: 3 predicted, 2 right: 2*2/(3+2); >= 0.5: 2 predicted, 1 right: 2*1/(2+2); >= 0.95: nothing: 0
    assert dice_per_threshold(prob, truth, (0.4, 0.5, 0.95)) == [0.8, 0.5, 0.0]
    assert dice_per_threshold(prob, np.zeros_like(truth), (0.95,)) == [1.0]  # both empty


def test_choice_is_the_best_threshold_and_ties_go_to_the_one_nearest_0_5():
    assert choose([0.70, 0.80, 0.75], (0.4, 0.45, 0.5)) == 0.45
    assert choose([0.80, 0.70, 0.80, 0.80], (0.3, 0.4, 0.5, 0.6)) == 0.5
    assert choose([0.80, 0.70, 0.70, 0.80], (0.3, 0.45, 0.5, 0.6)) == 0.6


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset root with 64 px images, run folder of a 1-epoch LViT working at 32 px; 3 val images)."""
    return train_tiny_lvit(tmp_path_factory.mktemp("calibrate"), seed=2, n_val=3, n_test=2)


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_calibrate_writes_the_best_validation_threshold_and_lvit_test_scores_with_it(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    run = _copy(run, tmp_path)
    assert main(["calibrate", str(run), "--data", str(data), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((run / "threshold.json").read_text())
    assert record["split"] == "val" and record["n_images"] == 3 and record["thresholds"] == list(CANDIDATES)
    assert record["threshold"] == choose(record["dice"]) and record["dice_at_threshold"] == max(record["dice"])
    assert "<- chosen" in printed and "wrote" in printed
    # lvit test on the same images at that threshold gives the sweep's figure: one scoring, two commands.
    out = tmp_path / "val"
    assert main(["test", str(run), "--data", str(data), "--split", "val", "--out", str(out), "--no-progress"]) == 0
    assert "the model's, chosen on validation data" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["threshold"] == record["threshold"] and metrics["threshold_source"] == "model"
    assert metrics["original_resolution"]["mean_over_images"]["dice"] == pytest.approx(record["dice_at_threshold"],
                                                                                       abs=1e-9)
    # --threshold overrides it, and says so.
    out2 = tmp_path / "val-05"
    assert main(["test", str(run), "--data", str(data), "--split", "val", "--out", str(out2), "--threshold", "0.5",
                 "--no-progress"]) == 0
    metrics = json.loads((out2 / "metrics.json").read_text())
    assert metrics["threshold"] == 0.5 and metrics["threshold_source"] == "given"
    assert metrics["original_resolution"]["mean_over_images"]["dice"] == pytest.approx(record["dice_at_0_5"],
                                                                                       abs=1e-9)


def _write_record(run: Path, threshold: float, sha: str | None = None) -> None:
    from lvit.artifacts.threshold import file_sha256

    sha = sha or file_sha256(run / "checkpoints" / "best.safetensors")
    (run / "threshold.json").write_text(json.dumps({"threshold": threshold, "split": "val", "n_images": 3,
                                                    "weights_sha256": sha}))


def test_predict_cuts_at_the_models_threshold_unless_told_otherwise(tiny_run, tmp_path, capsys):
    from lvit.data import read_image
    from lvit.inference import Segmenter

    data, run = tiny_run
    run = _copy(run, tmp_path)
    image = next((data / "Test_Folder" / "img").iterdir())
    text = "Unilateral pulmonary infection, one infected area, middle left lung."
    prob = Segmenter(run).predict(read_image(image), text)  # [H, W]
    # a threshold that cuts this map elsewhere than 0.5 does (the median, two decimals, away from 0.5)
    own_threshold = round(float(np.clip(np.median(prob), 0.05, 0.95)), 2)
    if abs(own_threshold - 0.5) < 0.01:
        own_threshold = 0.45
    assert (prob >= own_threshold).sum() != (prob >= 0.5).sum()

    def predict(name, *extra):
        out = tmp_path / f"{name}.png"
        assert main(["predict", str(run), "--image", str(image), "--text", text, "--out", str(out), *extra]) == 0
        return np.asarray(Image.open(out)) > 0, capsys.readouterr().out

    plain, said = predict("plain")
    assert "threshold 0.5 (the default" in said and np.array_equal(plain, prob >= 0.5)
    _write_record(run, own_threshold)
    own, said = predict("own")
    assert f"threshold {own_threshold:g} (the model's, chosen on val" in said
    assert np.array_equal(own, prob >= own_threshold)
    given, said = predict("given", "--threshold", "0.5")
    assert "threshold 0.5 (--threshold)" in said and np.array_equal(given, plain)


def test_a_threshold_chosen_for_other_weights_is_ignored_with_a_warning(tiny_run, tmp_path, capsys):
    from lvit.inference import Segmenter

    _, run = tiny_run
    run = _copy(run, tmp_path)
    _write_record(run, 0.3, sha="0" * 64)
    segmenter = Segmenter(run)
    assert segmenter.threshold == 0.5
    assert "chosen for other weights" in capsys.readouterr().err
    (run / "threshold.json").write_text('{"threshold": 1.5}')
    with pytest.raises(Exception, match="threshold.json: not a threshold record"):
        Segmenter(run).threshold  # noqa: B018 - the property is the check


def test_export_carries_the_threshold_and_the_card_states_it(tiny_run, tmp_path):
    from lvit.inference import Segmenter

    data, run = tiny_run
    run = _copy(run, tmp_path)
    _write_record(run, 0.35)
    folder = tmp_path / "folder"
    assert main(["export", str(run), "--hf", str(folder), "--dataset", "synthetic"]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["threshold"]["threshold"] == 0.35
    assert Segmenter(folder).threshold == 0.35
    assert "cut at probability 0.35, chosen on the val split" in (folder / "README.md").read_text()
    # A model folder is not calibrated in place (its card states the threshold); the run is.
    assert main(["calibrate", str(folder), "--data", str(data), "--no-progress"]) == 2


def test_calibrate_refuses_the_test_split_and_the_shipped_model(tiny_run, capsys):
    data, run = tiny_run
    with pytest.raises(SystemExit):
        main(["calibrate", str(run), "--data", str(data), "--split", "test"])
    assert main(["calibrate", "qata-lvit", "--data", str(data)]) == 2
    assert "shipped model" in capsys.readouterr().err


def test_explain_cuts_at_the_models_threshold(tiny_run, tmp_path):
    data, run = tiny_run
    run = _copy(run, tmp_path)
    _write_record(run, 0.4)
    image = next((data / "Test_Folder" / "img").iterdir())
    assert main(["explain", str(run), "--image", str(image), "--text", "Unilateral pulmonary infection, one "
                 "infected area, middle left lung.", "--out", str(tmp_path / "explain")]) == 0
    assert json.loads((tmp_path / "explain" / "explain.json").read_text())["threshold"] == 0.4


def test_calibrate_never_writes_into_a_model_folder_named_by_its_weights_and_a_bad_record_is_one_line(
        tiny_run, tmp_path, capsys):
    data, run = tiny_run
    folder = tmp_path / "folder"
    assert main(["export", str(run), "--hf", str(folder), "--dataset", "synthetic"]) == 0
    before = sorted(p.name for p in folder.iterdir())
    assert main(["calibrate", str(folder / "model.safetensors"), "--data", str(data), "--no-progress"]) == 2
    assert "a model folder" in capsys.readouterr().err and sorted(p.name for p in folder.iterdir()) == before
    copy = _copy(run, tmp_path)
    assert main(["calibrate", str(copy / "checkpoints" / "last.safetensors"), "--data", str(data),
                 "--no-progress"]) == 2
    assert "not the weights lvit test and predict use" in capsys.readouterr().err
    assert not (copy / "threshold.json").exists()
    (copy / "threshold.json").write_text("{not json")
    assert main(["test", str(copy), "--data", str(data), "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "threshold.json: unreadable threshold file" in err and "Traceback" not in err
