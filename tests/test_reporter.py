"""The report writer (reports from the image alone): decoding flags into the template, thresholds and scores,
training and storage, the writer at inference time, and segmentation with the reports it writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lvit.artifacts.reporter_folder import find_reporter, load_reporter, read_reporter_meta
from lvit.core.errors import CheckpointError, ConfigError, OutputExistsError
from lvit.data.describe import ZONES, Findings, format_report, parse_findings
from lvit.data.flags import (
    FLIPPED_ZONES,
    choose_thresholds,
    decode_flags,
    findings_from_probabilities,
    flag_metrics,
    likely_flag_sets,
    report_agreement,
    same_findings,
)
from lvit.inference import ReportWriter
from lvit.models.reporter import ReporterConfig, ZoneClassifier
from lvit.train.reporter import ReporterTraining, augment_batch, train_reporter

TINY = ReporterConfig(image_size=32, width=4, pool_grid=2, hidden=8, mask_head=False)


# --- the network ---------------------------------------------------------------------------------------------


def test_zone_classifier_maps_images_to_six_logits_and_checks_its_input():
    model = ZoneClassifier(TINY).eval()
    assert model(torch.rand(3, 1, 32, 32)).shape == (3, 6)
    with pytest.raises(ValueError, match=r"\[B, 1, 32, 32\]"):
        model(torch.rand(3, 3, 32, 32))
    with pytest.raises(ValueError, match="32 x 32"):
        model(torch.rand(3, 1, 64, 64))


@pytest.mark.parametrize("bad, match", [({"image_size": 40}, "multiple of 16"), ({"width": 0}, "width"),
                                        ({"dropout": 1.0}, "dropout"),
                                        ({"pool_grid": 5, "image_size": 64}, "pool_grid"),
                                        ({"colour": 3}, "unknown key")])
def test_reporter_config_refuses_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        ReporterConfig.from_dict(bad)
    assert ReporterConfig.from_dict(TINY.to_dict()) == TINY


# --- flags -> reports ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("allow_empty", [True, False])
def test_every_decoded_report_parses_back_into_the_template(allow_empty):
    rng = np.random.default_rng(0)
    probs = np.concatenate([rng.random((500, 6)), np.eye(6), np.zeros((1, 6)), np.ones((1, 6))])
    thresholds = rng.uniform(0.05, 0.95, 6)
    flags = decode_flags(probs, thresholds, allow_empty)
    findings = findings_from_probabilities(probs, thresholds, allow_empty)
    seen = set()
    for row, f in zip(flags, findings):
        for capitalize in (False, True):
            text = format_report(f, capitalize=capitalize)
            back = parse_findings(text)
            assert back == f and back.consistent and back.flags == tuple(int(x) for x in row)
            seen.add(back.flags)
        if not allow_empty:
            assert f.zones, "a writer trained without normal cases never writes 'no pulmonary infection.'"
    assert len(seen) > 20


@pytest.mark.parametrize("allow_empty", [True, False])
def test_possible_reports_are_every_report_the_flags_can_decode_to(allow_empty):
    from lvit.data.flags import possible_reports

    reports = possible_reports(allow_empty)
    assert len(reports) == len(set(reports)) == (64 if allow_empty else 63)
    assert {parse_findings(r).flags for r in reports} == {tuple(row) for row in np.ndindex(*(2,) * 6)
                                                         if any(row) or allow_empty}
    assert ("no pulmonary infection." in reports) is allow_empty
    rng = np.random.default_rng(1)  # whatever a writer decodes is one of them
    written = findings_from_probabilities(rng.random((300, 6)), rng.uniform(0.1, 0.9, 6), allow_empty)
    assert {format_report(f) for f in written} <= set(reports)
    assert possible_reports(allow_empty, capitalize=True) == [r[0].upper() + r[1:] for r in reports]


def test_no_zone_over_its_threshold_names_the_most_likely_one_unless_empty_reports_are_allowed():
    probs = np.array([[0.1, 0.2, 0.3, 0.05, 0.1, 0.0]])
    assert format_report(findings_from_probabilities(probs, [0.5] * 6, True)[0]) == "no pulmonary infection."
    assert (format_report(findings_from_probabilities(probs, [0.5] * 6, False)[0])
            == "unilateral pulmonary infection, one infected area, lower left lung.")
    with pytest.raises(ValueError, match="thresholds"):
        decode_flags(probs, [0.5] * 5)


def test_the_likely_flag_sets_and_their_weights_by_hand():
    probs = np.array([[0.9, 0.2, 0.1, 0.6, 0.5, 0.05]])
    sets, weights = likely_flag_sets(probs, 4, allow_empty=False)
    # every set shares p(the certain zones); it is the 0.6 and 0.5 zones that vary: 0.3, 0.3 (a tie), 0.2, 0.2
    assert sets.shape == (1, 4, 6) and sets.dtype == bool
    assert sets[0].astype(int).tolist() == [[1, 0, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0],
                                            [1, 0, 0, 0, 1, 0]]
    assert weights[0] == pytest.approx([0.3, 0.3, 0.2, 0.2])
    # k = 1 is the most probable set; a writer that may write "no infection" may get the empty set
    quiet = np.full((1, 6), 0.1)
    assert not likely_flag_sets(quiet, 1, allow_empty=True)[0].any()
    one, w = likely_flag_sets(quiet, 1, allow_empty=False)
    assert one.sum() == 1 and w[0] == pytest.approx([1.0])
    assert likely_flag_sets(np.random.default_rng(0).random((5, 6)), 63, allow_empty=False)[1].sum(1) \
        == pytest.approx(np.ones(5))
    for bad in (0, 64, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            likely_flag_sets(probs, bad, allow_empty=False)
    with pytest.raises(ValueError, match="expected scores"):
        likely_flag_sets(probs[:, :5], 2)


def test_thresholds_maximise_each_zones_f1_or_accuracy_on_val():
    truth = np.zeros((10, 6), bool)
    truth[:5, 0] = True
    probs = np.full((10, 6), 0.4)
    probs[:5, 0], probs[5:, 0] = 0.3, 0.1  # zone 0: positives score 0.3, negatives 0.1 -> a cut in (0.1, 0.3]
    t = choose_thresholds(probs, truth, "f1")
    assert 0.1 < t[0] <= 0.3
    assert all(t[1:] == 0.5)  # never named: F1 undefined, kept at 0.5
    acc = choose_thresholds(probs, truth, "accuracy")
    assert 0.1 < acc[0] <= 0.3 and all(acc[1:] > 0.4)  # all-negative zones: a threshold above every score
    with pytest.raises(ValueError, match="objective"):
        choose_thresholds(probs, truth, "auc")


def test_flag_metrics_and_report_agreement():
    truth = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0]], bool)
    pred = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 1]], bool)
    m = flag_metrics(pred, truth)
    assert m["exact"] == 0.5 and m["count_accuracy"] == 0.5 and m["sides_accuracy"] == 0.5
    assert m["zones"]["lower right"] == pytest.approx({"accuracy": 0.5, "precision": 0.5, "recall": 1.0,
                                                       "f1": 2 / 3, "positives": 1})
    reports = [format_report(Findings.from_flags(r)) for r in pred]
    true_reports = [format_report(Findings.from_flags(r), capitalize=True) for r in truth]
    assert json.dumps(report_agreement(reports, true_reports), sort_keys=True) == json.dumps(m, sort_keys=True)
    assert same_findings(true_reports[0], reports[0]) and not same_findings(true_reports[1], reports[1])


def test_a_flip_swaps_the_left_and_right_flags():
    assert [ZONES[i] for i in FLIPPED_ZONES] == [(lv, "right" if s == "left" else "left") for lv, s in ZONES]
    images = torch.zeros(4, 1, 8, 8)
    images[..., :4] = 1.0  # bright left half
    flags = torch.tensor([[1, 0, 0, 0, 0, 0]] * 4, dtype=torch.float32)
    out, out_flags = augment_batch(images, flags, torch.Generator().manual_seed(0), augment=False, hflip=1.0)
    assert torch.equal(out, images.flip(-1))
    assert out_flags.tolist() == [[0, 0, 0, 1, 0, 0]] * 4
    assert flags.tolist() == [[1, 0, 0, 0, 0, 0]] * 4  # inputs untouched
    same, same_flags = augment_batch(images, flags, torch.Generator().manual_seed(0), augment=True, hflip=0.0)
    assert same.shape == images.shape and torch.equal(same_flags, flags) and 0 <= same.min() and same.max() <= 1
    masks = images[:, :, ::2, ::2].clone()  # a coarser grid follows the same geometry
    _, _, out_masks = augment_batch(images, flags, torch.Generator().manual_seed(0), augment=False, hflip=1.0,
                                    masks=masks)
    assert torch.equal(out_masks, masks.flip(-1))
    moved, _, moved_masks = augment_batch(images, flags, torch.Generator().manual_seed(3), hflip=0.0, masks=masks)
    assert torch.allclose(moved[:, :, ::2, ::2].round(), moved_masks.round(), atol=1.0)
    assert (moved[:, :, ::2, ::2].round() == moved_masks.round()).float().mean() > 0.8


def test_the_mask_head_is_optional_and_only_adds_a_coarse_mask():
    plain = ZoneClassifier(TINY)
    with_mask = ZoneClassifier(ReporterConfig(**{**TINY.to_dict(), "mask_head": True}))
    assert plain.forward_all(torch.rand(2, 1, 32, 32))[1] is None
    flags, mask = with_mask.forward_all(torch.rand(2, 1, 32, 32))
    assert flags.shape == (2, 6) and mask.shape == (2, 1, 4, 4)
    assert set(with_mask.state_dict()) - set(plain.state_dict()) == {"mask_logits.weight", "mask_logits.bias"}


# --- training, storage, inference ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def writer_dir(tiny_synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("writer") / "w"
    meta = train_reporter(tiny_synth, out, model_config=TINY, training=ReporterTraining(epochs=2, batch_size=4),
                          progress=False, log=None)
    assert meta["folder"] == str(out)
    return out


def test_training_writes_a_complete_writer_folder(writer_dir):
    meta = json.loads((writer_dir / "reporter.json").read_text())
    assert meta["format"] == "lvit-reporter" and meta["model"] == TINY.to_dict()
    assert len(meta["thresholds"]) == 6 and meta["capitalize"] is True  # synth reports are capitalised
    assert meta["allow_empty"] is True  # the synthetic data has normal cases
    assert meta["data"]["n_train"] == 12 and meta["data"]["n_val"] == 4
    assert set(meta["val"]) == {"thresholds_chosen", "threshold_0.5", "most_frequent_report",
                                "beats_most_frequent_report"}
    lines = (writer_dir / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,val_loss") and len(lines) == 3
    assert 1 <= meta["best_epoch"] <= 2


def test_the_writer_writes_one_template_report_per_image_of_any_size(writer_dir):
    writer = ReportWriter(writer_dir)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (64, 64), dtype=np.uint8), rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)]
    reports = writer.reports(images)
    assert len(reports) == 2
    for text in reports:
        assert text[0].isupper() and parse_findings(text).consistent
    assert writer.report(images[0]) == reports[0]
    assert writer.probabilities(images).shape == (2, 6)


def test_a_run_folder_carries_its_writer_and_broken_writers_are_one_line_errors(writer_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(writer_dir, run / "reporter")
    assert find_reporter(run) == run / "reporter" and find_reporter(writer_dir) == writer_dir
    assert find_reporter(tmp_path / "nothing") is None
    with pytest.raises(CheckpointError, match="no report writer here"):
        read_reporter_meta(tmp_path)
    meta_path = run / "reporter" / "reporter.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "thresholds": [0.5] * 5}))
    with pytest.raises(CheckpointError, match="six numbers"):
        load_reporter(run)
    meta_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_reporter(run)
    meta_path.write_text(json.dumps({**meta, "model": {**meta["model"], "width": 8}}))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_reporter(run)
    meta_path.write_text(json.dumps(meta))
    (run / "reporter" / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_reporter(run)


def test_training_refuses_a_non_empty_folder_and_reports_outside_the_template(tiny_synth, tmp_path, writer_dir):
    with pytest.raises(OutputExistsError):
        train_reporter(tiny_synth, writer_dir, model_config=TINY, training=ReporterTraining(epochs=1),
                       progress=False, log=None)
    with pytest.raises(ConfigError, match="hflip"):
        ReporterTraining(hflip=2.0)
    from lvit.core.errors import DataError
    from lvit.data.records import Record
    from lvit.train.reporter import load_flag_data

    records = [Record("a.png", tiny_synth / "x.png", None, "Nuclei are dense and round.")]
    with pytest.raises(DataError, match="no report in LViT's template"):
        load_flag_data(records, 32)


def test_cli_train_reporter(tiny_synth, tmp_path, capsys):
    from lvit.commands.cli import main

    assert main(["train-reporter", "--data", str(tiny_synth)]) == 2
    assert "RUN_DIR" in capsys.readouterr().err
    out = tmp_path / "w"
    code = main(["train-reporter", "--data", str(tiny_synth), "--out", str(out), "--epochs", "1", "--image-size", "32",
                 "--width", "4", "--batch-size", "4", "--no-progress", "--threads", "1", "--hflip", "0.5"])
    assert code == 0 and (out / "reporter.json").is_file() and (out / "weights.safetensors").is_file()
    meta = json.loads((out / "reporter.json").read_text())
    assert meta["model"]["mask_head"] is True and meta["model"]["pool_grid"] == 2 and meta["training"]["hflip"] == 0.5
    assert len(ReportWriter(out).reports([np.zeros((40, 40), np.uint8)])) == 1
    assert "report writer ->" in capsys.readouterr().out
    assert main(["train-reporter", str(tmp_path / "not-a-run"), "--data", str(tiny_synth)]) == 2


# --- segmentation with generated reports ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tiny_synth, tmp_path_factory) -> tuple[Path, Path]:
    from lvit.presets import preset_path
    from lvit.train import load_config
    from lvit.train.runner import train

    base = tmp_path_factory.mktemp("runs")
    common = ["model.image_size=32", "model.base_channels=8", "model.vit_heads=4", "data.batch_size=4",
              "trainer.max_epochs=1", "trainer.progress=false", "data.num_workers=0"]
    train(load_config(preset_path("synth"), common), tiny_synth, base / "lvit")
    train(load_config(preset_path("synth"), common + ["model_name=lvit-t"]), tiny_synth, base / "lvit-t")
    return base / "lvit", base / "lvit-t"


def test_segment_with_reports_scores_each_list_like_the_text_probe(tiny_synth, tiny_runs, writer_dir):
    from lvit.data import load_split
    from lvit.evaluate.reporter import segment_with_reports
    from lvit.evaluate.text_probe import probe_reports
    from lvit.inference import write_reports

    run, run_t = tiny_runs
    records = load_split(tiny_synth, "test")
    generated, probs = write_reports(ReportWriter(writer_dir), records, batch_size=3)
    assert len(generated) == len(records) == len(probs) and all(parse_findings(t).consistent for t in generated)
    result = segment_with_reports(run, records, {"true": [r.text for r in records], "generated": generated},
                                  batch_size=3, keep_masks=True)
    probe = probe_reports(run, tiny_synth, "test", variants=("true",), batch_size=3)
    assert result["sources"]["true"]["dice"] == pytest.approx(probe["variants"]["true"]["dice"], abs=1e-9)
    assert result["masks"]["generated"].shape == (len(records), 32, 32) and result["counts"]["true"].shape == (4, 3)
    free = segment_with_reports(run_t, records)
    assert list(free["sources"]) == ["image only"] and free["uses_text"] is False
    with pytest.raises(ConfigError, match="2 report"):
        segment_with_reports(run, records, {"true": ["a", "b"]})


# --- lvit predict / lvit test without reports ----------------------------------------------------------------


@pytest.fixture()
def run_with_writer(tiny_runs, writer_dir, tmp_path) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_runs[0], run)
    shutil.copytree(writer_dir, run / "reporter")
    return run


def test_predict_without_text_writes_the_mask_and_its_generated_report(run_with_writer, tiny_synth, tmp_path, capsys):
    from lvit.commands.cli import main
    from lvit.data import read_mask

    image = next((tiny_synth / "Test_Folder" / "img").iterdir())
    out = tmp_path / "pred" / "mask.png"
    assert main(["predict", str(run_with_writer), "--image", str(image), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report_file = tmp_path / "pred" / "mask.report.txt"
    assert read_mask(out).shape == (64, 64) and report_file.is_file()
    report = report_file.read_text().strip()
    assert parse_findings(report).consistent and f'"{report}"' in printed and "generated from the image" in printed
    assert "most likely reports" in printed  # the mask averages over them
    # --text auto asks for the same explicitly; an existing report file is not overwritten without --force
    assert main(["predict", str(run_with_writer), "--image", str(image), "--out", str(out), "--text", "auto"]) == 2
    assert main(["predict", str(run_with_writer), "--image", str(image), "--out", str(out), "--text", "AUTO",
                 "--force"]) == 0
    assert report_file.read_text().strip() == report
    # a real report is used as given: no report file
    other = tmp_path / "given.png"
    assert main(["predict", str(run_with_writer), "--image", str(image), "--out", str(other), "--text",
                 "Unilateral pulmonary infection, one infected area, lower left lung."]) == 0
    assert other.is_file() and not (tmp_path / "given.report.txt").exists()


def test_an_exported_folder_ships_every_report_its_writer_can_write_already_encoded(run_with_writer, tiny_synth,
                                                                                    tmp_path, monkeypatch, capsys):
    from lvit.artifacts.model_folder import export_model_folder
    from lvit.commands.cli import main
    from lvit.data import load_split
    from lvit.text.encoders import HFEncoder

    train_reports = [r.text for r in load_split(tiny_synth, "train")]
    folder = export_model_folder(run_with_writer, tmp_path / "folder", report_texts=train_reports)
    assert (folder / "reporter" / "reporter.json").is_file()
    image = next((tiny_synth / "Test_Folder" / "img").iterdir())
    reference = tmp_path / "run-mask.png"
    assert main(["predict", str(run_with_writer), "--image", str(image), "--out", str(reference)]) == 0
    capsys.readouterr()

    def no_model(self):
        raise AssertionError("the text model was loaded")

    monkeypatch.setattr(HFEncoder, "_load", no_model)
    out = tmp_path / "folder-mask.png"
    assert main(["predict", str(folder), "--image", str(image), "--out", str(out)]) == 0
    assert "generated from the image by the report writer" in capsys.readouterr().out
    assert out.read_bytes() == reference.read_bytes()
    assert (tmp_path / "folder-mask.report.txt").read_text() == (tmp_path / "run-mask.report.txt").read_text()


def test_predict_without_text_and_without_a_writer_says_how_to_get_one(tiny_runs, writer_dir, tiny_synth, tmp_path,
                                                                      capsys):
    from lvit.commands.cli import main

    image = next((tiny_synth / "Test_Folder" / "img").iterdir())
    out = tmp_path / "m.png"
    assert main(["predict", str(tiny_runs[0]), "--image", str(image), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "lvit train-reporter" in err and "--reporter DIR" in err and not out.exists()
    assert main(["predict", str(tiny_runs[0]), "--image", str(image), "--out", str(out), "--reporter",
                 str(writer_dir)]) == 0
    assert out.is_file() and (tmp_path / "m.report.txt").is_file()
    assert main(["predict", str(tiny_runs[0]), "--image", str(image), "--out", str(tmp_path / "n.png"), "--reporter",
                 str(tmp_path)]) == 2
    assert "no report writer" in capsys.readouterr().err


def test_the_answer_over_written_reports_is_the_weighted_mean_of_the_answers_with_each(run_with_writer, tiny_synth):
    from lvit.data import load_split, read_image
    from lvit.inference import Segmenter, to_original_size
    from lvit.inference.segmenter import MIXED_REPORTS

    segmenter = Segmenter(run_with_writer)
    writer = segmenter.report_writer
    images = [read_image(r.image_path) for r in load_split(tiny_synth, "test")[:3]]
    batch = torch.stack([segmenter.preprocess(im) for im in images])
    reports, weights = writer.likely_reports(writer.probabilities(images), 3)
    assert len(reports) == 3 and all(len(row) == 3 and len(set(row)) == 3 for row in reports)
    mixed = segmenter.logits_over_reports(batch, reports, weights, chunk=4)  # chunks cut across images
    for b in range(3):  # the long way: each report alone, probabilities averaged with the weights
        probs = [torch.sigmoid(segmenter.logits(batch[b:b + 1], *segmenter.text_for([r], 1)))[0] for r in reports[b]]
        mean = sum(float(w) * p for w, p in zip(weights[b], probs))
        assert torch.allclose(torch.sigmoid(mixed[b]), mean, atol=1e-5)
    # predict_written: the mean over the writer's MIXED_REPORTS likely reports, with the writer's own report
    probs, written = segmenter.predict_written(images)
    assert written == writer.reports(images)
    reports, weights = writer.likely_reports(writer.probabilities(images), MIXED_REPORTS)
    expected = segmenter.logits_over_reports(batch, reports, weights)
    for b, image in enumerate(images):
        assert probs[b].shape == image.shape[:2]
        assert np.allclose(probs[b], to_original_size(expected[b:b + 1], image.shape[:2])[0, 0].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="3 images, 2 report lists"):
        segmenter.logits_over_reports(batch, reports[:2], weights)


def test_predict_a_folder_without_a_report_table(run_with_writer, tiny_synth, tmp_path):
    import csv

    from lvit.commands.cli import main

    out = tmp_path / "out"
    assert main(["predict", str(run_with_writer), "--images", str(tiny_synth / "Test_Folder" / "img"), "--out",
                 str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "reports.csv").open()))
    assert len(rows) == 4 == len(list((out / "masks").iterdir()))
    assert all(parse_findings(r["report"]).consistent for r in rows)


def test_lvit_test_with_generated_reports(run_with_writer, tiny_runs, tiny_synth, tmp_path, capsys):
    import csv

    from lvit.commands.cli import main

    out = tmp_path / "t"
    assert main(["test", str(run_with_writer), "--data", str(tiny_synth), "--out", str(out), "--reports", "generated",
                 "--no-progress", "--k", "0"]) == 0
    printed = capsys.readouterr().out
    assert "reports generated from the images" in printed and "averages the writer's" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    exact = metrics["reports"]["agreement_with_true_reports"]["exact"]
    assert metrics["reports"]["source"] == "generated" and 0 <= exact <= 1
    rows = list(csv.DictReader((out / "reports.csv").open()))
    assert len(rows) == 4 and all(parse_findings(r["generated_report"]).consistent for r in rows)
    # the masks average over the writer's likely reports: the same masks as lvit predict writes without --text
    from lvit.data import load_split, read_image, read_mask
    from lvit.inference import Segmenter
    from lvit.inference.segmenter import MIXED_REPORTS

    assert metrics["reports"]["mixed_reports"] == MIXED_REPORTS and metrics["reports"]["path"] == "written"
    records = load_split(tiny_synth, "test")
    probs, written = Segmenter(run_with_writer).predict_written([read_image(r.image_path) for r in records])
    assert written == [r["generated_report"] for r in rows]
    for record, prob in zip(records, probs):
        assert np.array_equal(read_mask(out / "masks" / f"{Path(record.name).stem}.png") > 0, prob >= 0.5)
    assert main(["test", str(tiny_runs[1]), "--data", str(tiny_synth), "--out", str(tmp_path / "t2"), "--reports",
                 "generated"]) == 2
    assert "does not read reports" in capsys.readouterr().err


def test_lvit_app_gives_the_page_the_runs_report_writer(run_with_writer, tiny_runs, writer_dir, tiny_synth):
    from lvit.commands.app import report_writer_for
    from lvit.data import load_split, read_image
    from lvit.inference import Segmenter

    def writer_for(run, reporter=None):
        return report_writer_for(Segmenter(str(run), reporter=reporter))

    image = read_image(load_split(tiny_synth, "test")[0].image_path)
    report = writer_for(run_with_writer)(image)
    parse_findings(report)  # a report of the template
    assert writer_for(tiny_runs[0]) is None  # no writer: the page hides the button
    assert writer_for(tiny_runs[0], str(writer_dir))(image) == report
    assert writer_for(tiny_runs[1]) is None  # LViT-T reads no report
    with pytest.raises(ConfigError, match="does not read reports"):
        writer_for(tiny_runs[1], str(writer_dir))
    with pytest.raises(ConfigError, match="no report writer in this folder"):
        writer_for(tiny_runs[0], str(tiny_synth))


def test_train_reporter_never_writes_into_a_model_folder(tiny_runs, tiny_synth, tmp_path, capsys):
    from lvit.artifacts.model_folder import export_model_folder
    from lvit.commands.cli import main

    folder = tmp_path / "folder"
    export_model_folder(tiny_runs[0], folder)
    before = sorted(p.name for p in folder.iterdir())
    assert main(["train-reporter", str(folder), "--data", str(tiny_synth), "--epochs", "1", "--no-progress"]) == 2
    assert "lvit never writes into one: pass --out DIR" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_the_app_with_an_empty_box_answers_over_the_writers_likely_reports(run_with_writer, tiny_synth, tmp_path):
    pytest.importorskip("matplotlib")
    from lvit.commands.webapp import Page
    from lvit.data import load_split, read_image, read_mask

    path = load_split(tiny_synth, "test")[0].image_path
    page = Page(run_with_writer, work_dir=tmp_path / "work")
    result = page.segment(str(path), "  ", 0.5)
    assert result.ok, result.message
    (prob,), (report,) = page.segmenter.predict_written([read_image(path)])
    assert len(result.notes) == 1 and f'"{report}"' in result.notes[0] and "most likely reports" in result.notes[0]
    assert np.array_equal(read_mask(result.mask_file) > 0, prob >= 0.5)  # the mask is the averaged answer


def test_the_written_mixture_bench_mixes_as_the_segmenter_does_and_renders_its_table(run_with_writer, tiny_synth,
                                                                                     tmp_path, monkeypatch):
    from files import load_bench

    from lvit.data import load_pair, load_split
    from lvit.inference import Segmenter

    bench = load_bench("bench/written_mixture.py", "written_mixture")
    entry = bench.sweep(str(run_with_writer), tiny_synth, "test", [1, 2], None)
    segmenter = Segmenter(run_with_writer)
    writer = segmenter.report_writer
    expected = []
    for record in load_split(tiny_synth, "test"):
        image, truth = load_pair(record, segmenter.in_channels)
        reports, weights = writer.likely_reports(writer.probabilities([image]), 2)
        logits = segmenter.logits_over_reports(segmenter.preprocess(image)[None], reports, weights)
        expected.append(bench.score(torch.sigmoid(logits[0]).double(), image, truth))
    assert entry["n"] == 4 and entry["dice_original"]["2"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert entry["best_k"] in (1, 2)
    assert entry["weights_sha256"] == hashlib.sha256((run_with_writer / "checkpoints" / "best.safetensors")
                                                     .read_bytes()).hexdigest()
    entry.update(machine="m", command="c")
    raw, shipped, md = tmp_path / "raw.json", tmp_path / "shipped.json", tmp_path / "RESULTS.md"
    raw.write_text(json.dumps([entry]))
    shipped.write_text("{}")
    monkeypatch.setattr(bench, "RESULTS_JSON", raw)
    monkeypatch.setattr(bench, "SHIPPED_JSON", shipped)
    bench.render(md)
    row = next(line for line in md.read_text().splitlines()
               if line.startswith(f"| {run_with_writer} ({entry['weights_sha256'][:8]})"))
    assert row.endswith(f"| {entry['dice_original']['written']:.4f} | {entry['dice_original']['1']:.4f} | "
                        f"{entry['dice_original']['2']:.4f} | {entry['dice_original']['true']:.4f} |")
