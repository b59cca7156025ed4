"""Model folders in the Hugging Face layout: save/load for LViT, LViT-T and U-Net with identical outputs, the strict
and offline loader (pickles, stray files, Hub names refused in one line), ``lvit export RUN --hf`` with its model
card, and the commands taking a model folder wherever they take a run folder."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvit.artifacts.runs import LoadedRun, load_run, save_weights, write_run_config
from lvit.commands.cli import main
from lvit.core.errors import CheckpointError
from lvit.models import LViT, LViTConfig, UNet, build_model
from lvit.models.pretrained import MODEL_CONFIG, MODEL_WEIGHTS

TINY = dict(image_size=32, base_channels=8, text_dim=16, text_tokens=6, vit_heads=2)
TEXT = "Left lung: one infected area in the lower zone."


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (loading must never reach the network)."""

    def refuse(*args, **kwargs):
        raise AssertionError("lvit tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _tiny(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, LViTConfig(**{**TINY, **overrides})).eval()


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name, cls", [("lvit", LViT), ("lvit-t", LViT), ("unet", UNet)])
def test_save_and_load_give_identical_outputs(name, cls, tmp_path):
    model = _tiny(name)
    folder = model.save_pretrained(tmp_path / name)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", MODEL_CONFIG, MODEL_WEIGHTS]
    config = json.loads((folder / MODEL_CONFIG).read_text())
    assert config["model_name"] == name and config["library_name"] == "lvit" and config["lvit_format"] == 1
    assert (folder / "README.md").read_text().startswith("---\nlibrary_name: lvit\n")
    loaded = cls.from_pretrained(folder)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config == model.config
    image, text = torch.rand(2, 3, 32, 32), torch.rand(2, 6, 16)
    with torch.no_grad():
        assert torch.equal(loaded(image, text), model(image, text))
    run = load_run(folder)  # the run-loading layer reads model folders too
    assert isinstance(run, LoadedRun) and run.is_model_folder and run.weights == folder / MODEL_WEIGHTS
    assert run.model_name == name and run.reads_text == (name == "lvit") and run.text_embedding is None
    with torch.no_grad():
        assert torch.equal(run.model(image, text), model(image, text))


def test_from_pretrained_refuses_the_other_class_and_replaces_only_with_force(tmp_path):
    folder = _tiny("unet").save_pretrained(tmp_path / "unet")
    with pytest.raises(CheckpointError, match="holds a unet model.*UNet.from_pretrained"):
        LViT.from_pretrained(folder)
    with pytest.raises(Exception, match="not empty"):
        _tiny("lvit").save_pretrained(folder)
    _tiny("lvit").save_pretrained(folder, force=True)
    assert isinstance(LViT.from_pretrained(folder), LViT)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="notes.txt.*not replaced"):  # --force never clears a foreign folder
        _tiny("lvit").save_pretrained(tmp_path / "other", force=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("intruder, message", [
    ("pytorch_model.bin", "pytorch_model.bin holds weights in a format that can carry code"),
    ("weights.ckpt", "weights.ckpt holds weights"),
    ("notes.txt", "unexpected file notes.txt"),
    ("extra/", "unexpected folder extra"),
])
def test_a_folder_with_pickles_or_stray_files_is_refused_in_one_line(intruder, message, tmp_path, capsys):
    folder = _tiny("lvit-t").save_pretrained(tmp_path / "m")
    if intruder.endswith("/"):
        (folder / intruder.rstrip("/")).mkdir()
    else:
        (folder / intruder).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=message):
        LViT.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=message):
        load_run(folder)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(image)
    assert main(["predict", str(folder), "--image", str(image), "--out", str(tmp_path / "mask.png")]) == 2
    assert message.split()[0] in _one_line(capsys)
    assert not (tmp_path / "mask.png").exists()


def test_names_that_are_not_local_folders_are_never_downloaded(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.chdir(tmp_path)
    for name in ("someone/lvit-qata", tmp_path / "absent"):
        with pytest.raises(CheckpointError, match="never downloads"):
            LViT.from_pretrained(name)
    with pytest.raises(CheckpointError, match="never downloads"):
        load_run("someone/lvit-qata")
    assert main(["predict", "someone/lvit-qata", "--image", "x.png", "--out", "m.png"]) == 2
    assert "never downloads" in _one_line(capsys)
    # A Hugging Face folder of another library (no lvit_format) and a half-written one.
    other = tmp_path / "bert"
    other.mkdir()
    (other / MODEL_CONFIG).write_text(json.dumps({"model_type": "bert"}))
    (other / MODEL_WEIGHTS).write_bytes(b"")
    with pytest.raises(CheckpointError, match="not an lvit model config"):
        load_run(other)
    half = _tiny("unet").save_pretrained(tmp_path / "half")
    (half / MODEL_WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=f"no {MODEL_WEIGHTS}"):
        UNet.from_pretrained(half)


# --------------------------------------------------------------------------------------------------
# lvit export RUN --hf DIR, and the commands on the folder


def _run(base: Path, name: str = "lvit", learned: bool = False) -> Path:
    """A run folder as lvit train writes it (synth preset at 32 px), with seeded untrained weights."""
    from lvit.presets import preset_path
    from lvit.text import get_text_encoder
    from lvit.text.vocabulary import write_training_words
    from lvit.train import load_config

    cfg = load_config(preset_path("synth"), [f"model_name={name}", "model.image_size=32", "model.base_channels=8",
                                             "model.vit_heads=2", "trainer.max_epochs=1"])
    run = base / "run"
    (run / "checkpoints").mkdir(parents=True)
    reports = ["Left lung: one infected area in the lower zone.", "Right lung: two infected areas.",
               "No infection."]
    embedding, info = None, {"spec": "minilm", "max_tokens": 24, "min_words": 9, "dim": 384}
    if learned:
        encoder = get_text_encoder("learned", 24, texts=reports, dim=16)
        encoder.save(run / "vocab.json")
        torch.manual_seed(1)
        embedding = encoder.build_module(16, seed=1)
        info = {**encoder.describe(), "spec": "learned:vocab.json"}
    cfg.model.text_dim = info["dim"]
    torch.manual_seed(0)
    model = build_model(name, cfg.model).eval()
    write_run_config(run, {"lvit_version": "0.1.0", **cfg.to_dict(), "text_encoder": info,
                           "data_info": {"root": str(base / "data"), "n_train": 3, "n_val": 1, "image_size": 32,
                                         "in_channels": 3}})
    save_weights(run / "checkpoints" / "best.safetensors", model, embedding)
    write_training_words(run, reports)
    return run


@pytest.fixture(scope="module")
def tested_run(tmp_path_factory, tiny_synth):
    """A text run with `lvit test` output in RUN/test-test (the shared tiny synthetic set, cache kept apart)."""
    from lvit.evaluate.testing import run_test

    base = tmp_path_factory.mktemp("hf_run")
    run = _run(base)
    metrics = run_test(run, tiny_synth, "test", k=0, progress=False, cache_dir=base / "cache")
    return run, metrics, base / "cache"


def test_export_hf_writes_a_card_with_the_runs_metrics_and_commands_take_the_folder(tested_run, tiny_synth,
                                                                                   tmp_path, capsys):
    run, metrics, cache = tested_run
    folder = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", MODEL_CONFIG, MODEL_WEIGHTS, "report_words.json"]
    card = (folder / "README.md").read_text()
    config = json.loads((folder / MODEL_CONFIG).read_text())
    # The card: metrics of RUN/test-test/metrics.json, the text encoder and its tokens, preset, data, licence, use.
    dice, iou = metrics["dice"], metrics["iou"]
    assert f"| test | 4 | 0.5 | {dice:.4f} | {iou:.4f} |" in card  # split, images, threshold, Dice, IoU
    assert f"value: {dice}" in card  # model-index metadata for the Hub, naming the threshold it was measured at
    assert "name: Dice (mean over images, threshold 0.5)" in card
    assert "`minilm`" in card and "**24 tokens**" in card and "384-d" in card
    assert "preset: synth, with" in card and "`model.image_size=32`" in card
    assert "no licence restrictions" in card and "not for diagnosis" in card.lower()
    assert config["metrics"]["test"][0]["dice"] == dice
    assert str(tiny_synth) not in json.dumps(config) and "/data" not in json.dumps(config["data_info"])
    capsys.readouterr()

    # predict: the folder gives the run's probabilities, bit for bit.
    from lvit.core.overlays import probability_png
    from lvit.inference import Segmenter

    image = tmp_path / "x.png"
    pixels = (np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(image)
    assert main(["predict", str(folder), "--image", str(image), "--text", TEXT, "--out", str(tmp_path / "m.png"),
                 "--prob", str(tmp_path / "p.png")]) == 0
    assert "warning" not in capsys.readouterr().err  # no best/last or report warning for a model folder
    expected = probability_png(Segmenter(run, cache_dir=cache).predict(pixels[..., None], TEXT))
    assert np.array_equal(np.array(Image.open(tmp_path / "p.png")), expected)
    # test: writes nothing into the folder; with --out, the run's figures.
    assert main(["test", str(folder), "--data", str(tiny_synth), "--no-progress"]) == 2
    assert "pass --out" in _one_line(capsys)
    out = tmp_path / "test"
    assert main(["test", str(folder), "--data", str(tiny_synth), "--out", str(out), "--k", "0",
                 "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["dice"] == pytest.approx(dice, abs=1e-6)
    # explain loads it too (its Grad-CAM itself: test_gradcam.py); nothing was written into the folder.
    assert main(["explain", str(folder), "--list-layers"]) == 0
    assert "up.0 " in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", MODEL_CONFIG, MODEL_WEIGHTS, "report_words.json"]
    # Re-exporting is refused without --force, and never into the run itself.
    assert main(["export", str(run), "--hf", str(folder)]) == 2
    assert "--force" in _one_line(capsys)
    assert main(["export", str(run), "--hf", str(run / "hf")]) == 2
    assert "inside the source folder" in _one_line(capsys)


@pytest.mark.parametrize("name", ["lvit-t", "unet"])
def test_export_hf_of_text_free_models_predicts_like_the_run(name, tmp_path, capsys):
    run = _run(tmp_path, name)
    folder = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(folder), "--dataset", "private-set",
                 "--data-licence", "internal use only"]) == 0
    card = (folder / "README.md").read_text()
    assert "internal use only" in card and "No test metrics" in card and "does not read reports" in card
    from lvit.inference import Segmenter

    image = (np.random.default_rng(1).random((50, 36, 3)) * 255).astype(np.uint8)
    assert np.array_equal(Segmenter(run).predict(image), Segmenter(folder).predict(image))


def test_learned_text_backend_travels_with_the_folder(tmp_path):
    from lvit.inference import Segmenter

    run = _run(tmp_path, learned=True)
    folder = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(folder)]) == 0
    assert {"vocab.json", "text_embedding.safetensors"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / MODEL_CONFIG).read_text())["text_encoder"]["spec"] == "learned:vocab.json"
    loaded = load_run(folder)
    assert loaded.text_embedding is not None
    image = (np.random.default_rng(2).random((40, 40)) * 255).astype(np.uint8)
    assert np.array_equal(Segmenter(run).predict(image, TEXT), Segmenter(folder).predict(image, TEXT))
    (folder / "vocab.json").unlink()  # half a learned backend is refused
    with pytest.raises(CheckpointError, match="come together"):
        load_run(folder)
