"""The chest X-ray model shipped inside lvit (lvit/resources/models/qata-lvit) and model folders that carry their
training reports already encoded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from files import load_bench
from PIL import Image

from lvit.commands.cli import main

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "shipped_model.json"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from lvit.data.synthetic import generate_synthetic
    from lvit.presets import preset_path
    from lvit.train import load_config
    from lvit.train.runner import train

    base = tmp_path_factory.mktemp("cache")
    data = generate_synthetic(base / "data", n_train=6, n_val=2, n_test=2, size=64, seed=1, progress=False)
    train(load_config(preset_path("synth"), ["model.image_size=32", "model.base_channels=8", "data.batch_size=3",
                                             "trainer.max_epochs=1", "trainer.progress=false",
                                             "data.num_workers=0"]), data, base / "run")
    return data, base / "run"


def test_a_folder_with_encoded_training_reports_never_loads_the_text_model_for_them(tiny_run, tmp_path,
                                                                                     monkeypatch):
    from lvit.artifacts.model_folder import export_model_folder
    from lvit.data import load_split, read_image
    from lvit.inference import Segmenter
    from lvit.text.encoders import HFEncoder

    data, run = tiny_run
    train_reports = [r.text for r in load_split(data, "train")]
    folder = export_model_folder(run, tmp_path / "folder", report_texts=train_reports)
    assert (folder / "report_cache.safetensors").is_file()
    image = read_image(load_split(data, "test")[0].image_path)
    reference = Segmenter(run).predict(image, train_reports[0])  # the run folder: encoded by the text model

    def no_model(self):
        raise AssertionError("the text model was loaded")

    with monkeypatch.context() as m:
        m.setattr(HFEncoder, "_load", no_model)
        shipped = Segmenter(folder).predict(image, train_reports[0])
    assert np.array_equal(shipped, reference)
    unseen = "bilateral pulmonary infection, two infected areas, upper left lung and upper right lung."
    assert unseen not in train_reports
    assert np.isfinite(Segmenter(folder).predict(image, unseen)).all()  # a report it lacks: the text model runs
    copy = export_model_folder(folder, tmp_path / "copy")  # re-exporting a model folder keeps the file
    assert (copy / "report_cache.safetensors").read_bytes() == (folder / "report_cache.safetensors").read_bytes()


def test_float16_export_keeps_a_tensor_beyond_float16s_range_in_float32(tiny_run, tmp_path):
    """A BatchNorm running variance above 65504 (the shipped run's text projection holds 1.6e5) would become
    infinity in float16; the export keeps such a tensor in float32 and says so, and the folder loads finite."""
    import torch
    from safetensors import safe_open

    from lvit.artifacts.model_folder import export_model_folder
    from lvit.artifacts.runs import load_run

    _, run_dir = tiny_run
    run = load_run(run_dir, map_location="cpu")
    name, buffer = next((k, v) for k, v in run.model.named_buffers() if k.endswith("running_var"))
    buffer.fill_(1.6e5)
    folder = export_model_folder(run_dir, tmp_path / "half", run=run, half=True)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes[name] == "F32"
    assert {d for k, d in dtypes.items() if k != name and d.startswith("F")} == {"F16"}
    config = json.loads((folder / "config.json").read_text())
    assert config["weights_dtype"] == "float16" and config["float32_tensors"] == [name]
    loaded = dict(load_run(folder, map_location="cpu").model.named_buffers())[name]
    assert torch.equal(loaded, torch.full_like(loaded, 1.6e5))


def test_two_exports_of_the_same_weights_are_the_same_bytes(tiny_run, tmp_path):
    """A card states the sha256 of the weights file: exporting the same weights again must reproduce it."""
    from lvit.artifacts.model_folder import export_model_folder

    _, run_dir = tiny_run
    from safetensors import safe_open

    for half in (False, True):
        a = export_model_folder(run_dir, tmp_path / f"a{half}", half=half) / "model.safetensors"
        b = export_model_folder(run_dir, tmp_path / f"b{half}", half=half) / "model.safetensors"
        assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
        with safe_open(str(a), "pt") as f:  # one key: safetensors writes a metadata map in no fixed order
            assert f.metadata() == {"format": "pt"}


# --- the shipped model ------------------------------------------------------------------------------------------


def _shipped():
    from lvit.artifacts.runs import DEFAULT_MODEL, shipped_model

    folder = shipped_model(DEFAULT_MODEL)
    assert folder is not None, "lvit ships no default model"
    return folder, json.loads(RESULTS.read_text())


def test_the_shipped_folder_is_the_measured_one_and_small():
    folder, results = _shipped()
    chosen = json.loads((folder / "config.json").read_text())["threshold"]
    assert chosen["threshold"] == results["threshold"]["threshold"] and chosen["split"] == "val"
    assert chosen["dice_at_threshold"] == max(chosen["dice"])
    weights = folder / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == results["weights_sha256"]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 16 * 1024 * 1024  # 16 MiB
    card = (folder / "README.md").read_text()
    for needle in (results["weights_sha256"], f"{results['dice_original']:.4f}", "research use only",
                   results["command"], f"{results['sample_test']['dice_original']:.4f}"):
        assert needle.lower() in card.lower(), needle


def test_predict_with_no_model_argument_uses_the_shipped_model(tmp_path, capsys):
    folder, results = _shipped()
    Image.fromarray(np.full((224, 224), 100, np.uint8)).save(tmp_path / "x.png")
    report = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."
    assert main(["predict", "--image", str(tmp_path / "x.png"), "--text", report, "--out",
                 str(tmp_path / "m.png")]) == 0
    out = capsys.readouterr().out
    assert "the shipped qata-lvit" in out.splitlines()[0]
    assert Image.open(tmp_path / "m.png").size == (224, 224)


def test_without_a_report_the_shipped_model_answers_through_its_no_report_path_without_the_text_model(
        tmp_path, capsys, monkeypatch):
    from lvit.inference.requests import NO_REPORT_NOTE
    from lvit.text.encoders import HFEncoder

    folder, results = _shipped()
    assert results["report_dropout"] > 0 and "no_report" in results
    card = (folder / "README.md").read_text()
    assert f"{results['no_report']['dice_original']:.4f}" in card and "without a report" in card

    def no_model(self):
        raise AssertionError("the text model was loaded")

    monkeypatch.setattr(HFEncoder, "_load", no_model)
    image = np.zeros((224, 224), np.uint8)
    image[40:180, 20:100] = 180
    Image.fromarray(image).save(tmp_path / "x.png")
    assert main(["predict", "--image", str(tmp_path / "x.png"), "--out", str(tmp_path / "m.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "the shipped qata-lvit" in lines[0]
    assert any(NO_REPORT_NOTE in line for line in lines)
    assert Image.open(tmp_path / "m.png").size == (224, 224) and not (tmp_path / "m.report.txt").exists()


def test_the_shipped_folder_carries_no_report_writer_and_says_so(tmp_path, capsys):
    """The width-32 weights leave no room for the report writer under 16 MiB: the folder carries none, its
    no-report path answers without a report (above), the app hides its "Write the report" button, and
    ``--reports generated`` stops with one line that names the folder and how to give a writer."""
    from lvit.commands.app import report_writer_for
    from lvit.inference import Segmenter

    folder, results = _shipped()
    assert not (folder / "reporter").exists() and "reporter" not in results and "generated" not in results
    assert report_writer_for(Segmenter(folder)) is None
    assert main(["test", "qata-lvit", "--data", str(tmp_path), "--reports", "generated", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no report writer" in err[0] and "--reporter DIR" in err[0], err


def test_the_shipped_model_scores_the_card_figure_on_the_shared_qata_sample(shared_dir, tmp_path, monkeypatch):
    _, results = _shipped()
    sample = shared_dir / "datasets" / "QaTa-COV19-sample"
    monkeypatch.chdir(tmp_path)  # `lvit test NAME` writes beside the user: ./NAME-test-SPLIT
    assert main(["test", "qata-lvit", "--data", str(sample), "--no-progress", "--k", "0"]) == 0
    metrics = json.loads((tmp_path / "qata-lvit-test-test" / "metrics.json").read_text())
    stated = results["sample_test"]
    assert metrics["n_scored"] == stated["n_test"]
    assert abs(metrics["original_resolution"]["mean_over_images"]["dice"] - stated["dice_original"]) <= 1e-4
    assert abs(metrics["dice"] - stated["dice"]) <= 1e-4
    # without the reports: the model's no-report path (the card's "no report" figure) ...
    assert main(["test", "qata-lvit", "--data", str(sample), "--no-progress", "--k", "0", "--reports", "none",
                 "--out", str(tmp_path / "none")]) == 0
    metrics = json.loads((tmp_path / "none" / "metrics.json").read_text())
    assert abs(metrics["original_resolution"]["mean_over_images"]["dice"]
               - stated["no_report"]["dice_original"]) <= 1e-4
    # at the official threshold 0.5 instead of the model's own, the card's 0.5 figure
    assert metrics["threshold"] == results["threshold"]["threshold"] != 0.5
    assert main(["test", "qata-lvit", "--data", str(sample), "--no-progress", "--k", "0", "--threshold", "0.5",
                 "--out", str(tmp_path / "at-0.5")]) == 0
    metrics = json.loads((tmp_path / "at-0.5" / "metrics.json").read_text())
    assert abs(metrics["original_resolution"]["mean_over_images"]["dice"]
               - results["at_threshold_0_5"]["sample_test"]["dice_original"]) <= 1e-4


def test_flip_average_bench_scores_the_plain_answer_as_lvit_test_does(shared_dir):
    """bench/flip_average.py: its plain column is the shipped model's per-image Dice on the sample's test cases
    (the card's figure), and the averaged column comes from the same passes (a different number)."""
    bench = load_bench("bench/flip_average.py", "flip_average")
    entry = bench.score("qata-lvit", shared_dir / "datasets" / "QaTa-COV19-sample", "true")
    card = json.loads((REPO / "bench" / "shipped_model.json").read_text())["sample_test"]
    assert entry["n"] == card["n_test"]
    assert entry["dice_original_plain"] == pytest.approx(card["dice_original"], abs=1e-4)
    assert entry["dice_original_flip_average"] != entry["dice_original_plain"]


def test_the_cards_training_time_names_epochs_that_were_paused(tmp_path):
    """An epoch many times the median one was a stopped process or a shared CPU: the card says so and what the
    training itself took, instead of passing a pause off as training time."""
    bench = load_bench("bench/shipped_model.py", "shipped_model")
    (tmp_path / "metrics.csv").write_text("epoch,train_loss,seconds\n1,0.5,100\n2,0.4,110\n3,0.3,1000\n4,0.2,90\n")
    facts = bench.training_time(tmp_path)
    assert facts == {"epochs": 4, "train_minutes": 21.7, "epoch_seconds_median": 105.0, "slow_epochs": {"3": 1000.0}}
    results = {**json.loads(RESULTS.read_text()), **facts, "epochs": 4}
    card = bench.card_text(results)
    assert "epoch 3 (17 min) took more than 2 times the median epoch (105 s)" in card
    assert "about 7 minutes" in card  # 21.7 - (1000 - 105) / 60
    (tmp_path / "metrics.csv").write_text("epoch,train_loss,seconds\n1,0.5,100\n2,0.4,110\n")
    quiet = {**results, **bench.training_time(tmp_path)}
    assert "median epoch" not in bench.card_text(quiet)


def test_the_card_takes_the_swap_probe_only_from_the_same_run():
    """bench/qata.py's raw results are looked up by run name: an entry of that name whose true-report Dice is not
    the shipped run's belongs to another run and is not used."""
    bench = load_bench("bench/shipped_model.py", "shipped_model")
    entries = json.loads((REPO / "bench" / "qata_results.json").read_text())
    name, entry = next((n, e) for n, e in sorted(entries.items()) if (e.get("probe") or {}).get("variants"))
    probe = bench.text_probe_of(name, entry["dice"])
    assert probe["n_changed"] == entry["probe"]["variants"]["swapped"]["changed"]["n"]
    assert probe["true"] > probe["swapped"]
    assert bench.text_probe_of(name, entry["dice"] + 0.01) is None
    assert bench.text_probe_of("no-such-run-s0", 0.8) is None
    assert probe["threshold"] == entry["probe"]["threshold"]  # the card says where the probe's masks were cut
    results = {**json.loads(RESULTS.read_text()), "text_probe_swap": {**probe, "image_size": 128}}
    assert f"masks cut at {probe['threshold']:g}," in bench.card_text(results)


def test_the_written_mixture_section_says_the_shipped_weights_carry_no_writer(tmp_path, monkeypatch):
    """bench/written_mixture.py's section: its sweeps ran on earlier shipped weights; the shipped folder now has
    no writer, and the section says so with the weights' hash instead of stating writer figures it has not."""
    bench = load_bench("bench/written_mixture.py", "written_mixture")
    results = json.loads(RESULTS.read_text())
    raw = tmp_path / "raw.json"
    raw.write_text("[]")
    monkeypatch.setattr(bench, "RESULTS_JSON", raw)
    md = bench.render(tmp_path / "RESULTS.md").read_text()
    assert "generated" not in results
    assert f"sha256 {results['weights_sha256'][:8]}, base width {results['base_channels']}" in md
    assert "carry no report writer" in md


def test_other_seeds_come_from_bench_qata_rows_or_from_a_gpu_call(tmp_path):
    """``ship --seeds-from``: the shipped recipe's other seeds, from bench/qata.py's results by row or from one
    call of bench/gpu/qata_ship.py's results by label; the shipped seed is never listed twice."""
    bench = load_bench("bench/shipped_model.py", "shipped_model")
    rows = tmp_path / "qata_results.json"
    rows.write_text(json.dumps({"a-s0": {"row": "a", "seed": 0, "dice_original": 0.81},
                                "a-s1": {"row": "a", "seed": 1, "dice_original": 0.82},
                                "b-s1": {"row": "b", "seed": 1, "dice_original": 0.5}}))
    assert bench.earlier_seeds(f"{rows}:a", {0}) == [
        {"seed": 1, "dice_original": 0.82, "source": "qata_results.json: a-s1"}]
    calls = tmp_path / "qata_ship.json"
    run = lambda seed, dice: {"run": f"w32-s{seed}", "seed": seed, "test_true_reports": {"dice_original": dice}}
    calls.write_text(json.dumps({"calls": [{"call": "one", "runs": [run(0, 0.80), run(1, 0.81)]},
                                           {"call": "two", "runs": [run(0, 0.83), run(1, 0.84)]}]}))
    assert bench.earlier_seeds(f"{calls}:two", {1}) == [
        {"seed": 0, "dice_original": 0.83, "source": "qata_ship.json: two/w32-s0"}]
    with pytest.raises(SystemExit, match="no GPU call labelled 'three'"):
        bench.earlier_seeds(f"{calls}:three", set())


def test_another_seed_is_cut_at_the_threshold_its_own_validation_images_chose():
    """``seed-threshold``: a sweep of the seed's own run replaces its figure at 0.5 by the one at its chosen
    threshold (0.5 kept beside) and the card gives both means; a sweep of other weights or another run is refused."""
    bench = load_bench("bench/shipped_model.py", "shipped_model")
    results = {**json.loads(RESULTS.read_text()),
               "seeds": [{"seed": 0, "dice_original": 0.80, "source": "qata_ship.json: c/w32-s0"},
                         {"seed": 1, "dice_original": 0.84, "threshold": 0.6, "dice_original_at_0_5": 0.83}]}
    sweep = {"model": "W/runs/w32-s0", "reports": "true", "chosen": 0.55, "test_dice_at_0_5": 0.80004,
             "test_dice_at_chosen": 0.81}
    with pytest.raises(SystemExit, match="not seed 0's"):
        bench.seed_at_threshold(results, {**sweep, "test_dice_at_0_5": 0.79})
    with pytest.raises(SystemExit, match="no seed of the shipped recipe comes from a run named w32-s2"):
        bench.seed_at_threshold(results, {**sweep, "model": "W/runs/w32-s2"})
    with pytest.raises(SystemExit, match="with none reports"):
        bench.seed_at_threshold(results, {**sweep, "reports": "none"})
    with pytest.raises(SystemExit, match="measured weights bbbbbbbb, not the run's aaaaaaaa"):
        bench.seed_at_threshold(results, {**sweep, "weights_sha256": "b" * 64}, run_sha256="a" * 64)
    entry = bench.seed_at_threshold(results, {**sweep, "weights_sha256": "a" * 64}, run_sha256="a" * 64)
    assert entry == {"seed": 0, "dice_original": 0.81, "threshold": 0.55, "dice_original_at_0_5": 0.80,
                     "source": "qata_ship.json: c/w32-s0", "threshold_source": "threshold_sweep.json: W/runs/w32-s0"}
    card = bench.card_text(results)
    assert ("seed 0: 0.8100 (threshold 0.55; 0.8000 at 0.5), seed 1: 0.8400 (threshold 0.6; 0.8300 at 0.5); "
            "mean 0.8250 with each seed cut at the threshold its own validation images chose, 0.8150 at 0.5") in card


def test_the_card_says_when_the_training_images_were_the_lossy_gpu_copy(tmp_path):
    """``training-facts --pack``: the codec and coding error of bench/gpu/prepare.py's manifest reach the card;
    a file that is not such a manifest is one line naming it."""
    import lzma

    bench = load_bench("bench/shipped_model.py", "shipped_model")
    (tmp_path / "data").mkdir()
    manifest = {"images": {"codec": "webp", "quality": 90, "lossless": False}, "splits": {"val": {}, "train": {}},
                "coding_error": {"images_exact": 0, "psnr_db": {"min": 40.94, "median": 43.63, "mean": 43.7},
                                 "max_abs_grey_levels": 16}}
    (tmp_path / "data" / "manifest.json.xz").write_bytes(lzma.compress(json.dumps(manifest).encode()))
    (tmp_path / "text_cache").mkdir()
    (tmp_path / "text_cache" / "text-minilm-all-MiniLM-L6-v2-L24.safetensors").write_bytes(b"")
    coded = bench.training_images(tmp_path)
    assert coded["splits"] == ["train", "val"] and coded["quality"] == 90
    card = bench.card_text({**json.loads(RESULTS.read_text()), "training_images": coded})
    assert ("the train and val images were read from the copy that travels to a lent GPU (`python "
            "bench/gpu/prepare.py --qata ROOT --qata-quality 90 --qata-tokens 24 --qata-splits train,val`): WebP, "
            "lossy, quality 90 (PSNR against the originals min 40.9 / median 43.6 dB, at most 16 grey levels of 255 "
            "off)") in card
    # a lossless copy (prepare.py --qata-quality 0) has no PSNR: every image decodes exactly
    lossless = {**manifest, "images": {"codec": "webp", "quality": None, "lossless": True},
                "coding_error": {"images_exact": 9, "psnr_db": None, "max_abs_grey_levels": 0}}
    (tmp_path / "data" / "manifest.json.xz").write_bytes(lzma.compress(json.dumps(lossless).encode()))
    card = bench.card_text({**json.loads(RESULTS.read_text()), "training_images": bench.training_images(tmp_path)})
    assert "--qata-quality 0 --qata-tokens 24" in card and "WebP, lossless (every image decoded exactly)" in card
    assert "read from the copy" not in bench.card_text({k: v for k, v in json.loads(RESULTS.read_text()).items()
                                                          if k != "training_images"})
    (tmp_path / "data" / "manifest.json.xz").write_bytes(b"not xz")
    with pytest.raises(SystemExit, match="manifest.json.xz: not a bench/gpu/prepare.py pack manifest"):
        bench.training_images(tmp_path)


def test_seed_threshold_writes_both_means_and_refuses_a_shipped_model_without_a_threshold(tmp_path, monkeypatch):
    import argparse

    bench = load_bench("bench/shipped_model.py", "shipped_model")
    monkeypatch.setattr(bench, "write_card", lambda: None)
    shipped = json.loads(RESULTS.read_text())
    results = {**shipped, "seeds": [{"seed": 0, "dice_original": 0.80, "source": "qata_ship.json: c/w32-s0"},
                                    {"seed": 1, "dice_original": 0.84, "threshold": 0.6}],
               "at_threshold_0_5": {**shipped["at_threshold_0_5"], "dice_original": 0.83}}
    sweeps = tmp_path / "sweep.json"
    sweeps.write_text(json.dumps([{"model": "W/runs/w32-s0", "reports": "true", "chosen": 0.55,
                                   "test_dice_at_0_5": 0.80, "test_dice_at_chosen": 0.81}]))
    raw = tmp_path / "shipped.json"
    raw.write_text(json.dumps(results))
    assert bench.seed_threshold(argparse.Namespace(sweep=sweeps, model="W/runs/w32-s0"), raw) == 0
    seeds = json.loads(raw.read_text())["seeds"]
    assert seeds[0]["dice_original"] == 0.81 and seeds[0]["dice_original_at_0_5"] == 0.80
    assert seeds[1]["dice_original_at_0_5"] == 0.83  # the shipped seed's figure at 0.5, for the second mean
    assert "mean 0.8250 with each seed cut at the threshold its own validation images chose, 0.8150 at 0.5" in \
        bench.card_text(json.loads(raw.read_text()))
    with pytest.raises(SystemExit, match="no entry for W/runs/w32-s9"):
        bench.seed_threshold(argparse.Namespace(sweep=sweeps, model="W/runs/w32-s9"), raw)
    raw.write_text(json.dumps({k: v for k, v in results.items() if k != "at_threshold_0_5"}))
    with pytest.raises(SystemExit, match="the shipped seed has no threshold of its own yet"):
        bench.seed_threshold(argparse.Namespace(sweep=sweeps, model="W/runs/w32-s0"), raw)
