"""`lvit train --init-from`: a U-Net run starts LViT's CNN branch (the official LViT_pretrain), the rest keeps its
initialisation, init_from.json lists both, and a source that matches nothing is a one-line error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from badinputs import assert_one_line_error, run_cli

from lvit.artifacts.runs import load_weights
from lvit.core.errors import CheckpointError

TINY = ["--config", "synth", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress",
        "--set", "model.image_size=32", "--set", "model.base_channels=8", "--set", "model.vit_heads=2",
        "--set", "data.augment=false"]


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory) -> tuple[Path, Path]:
    from lvit.data import generate_synthetic

    base = tmp_path_factory.mktemp("init")
    data = generate_synthetic(base / "data", n_train=6, n_val=2, n_test=2, size=32, seed=0, progress=False)
    code, _, err = run_cli(["train", "--data", data, "--out", base / "unet", "--model", "unet", *TINY])
    assert code == 0, err
    return data, base / "unet"


def test_unet_weights_start_lvits_cnn_branch(unet_run, tmp_path, monkeypatch):
    data, unet = unet_run
    source = load_weights(unet / "checkpoints" / "best.safetensors")
    captured = {}  # the model's tensors just before and after loading
    from lvit.train import runner

    real = runner.load_matching

    def spy(model, src):
        captured["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        report = real(model, src)
        captured["after"] = {k: v.clone() for k, v in model.state_dict().items()}
        return report

    monkeypatch.setattr(runner, "load_matching", spy)
    code, out, err = run_cli(["train", "--data", data, "--out", tmp_path / "lvit", "--model", "lvit", *TINY,
                              "--epochs", "1", "--init-from", unet])
    assert code == 0, err
    report = json.loads((tmp_path / "lvit" / "init_from.json").read_text())
    assert report["parts"]["stem"] == report["parts"]["head"] == 1.0 and report["parts"]["vit_down"] == 0.0
    assert report["sha256"] == hashlib.sha256(Path(report["weights"]).read_bytes()).hexdigest()
    assert f"{report['counts']['loaded']} of {report['counts']['model']} tensors loaded, covering" in out
    assert "at initialisation:" in out and "vit_down" in out.split("at initialisation:")[1]
    before, after = captured["before"], captured["after"]
    matching = {k for k, v in source.items() if k in after and after[k].shape == v.shape}
    assert set(report["loaded"]) == matching and len(matching) > 100
    assert {s["key"] for s in report["skipped_from_source"]} == set(source) - matching  # the transposed convs
    assert set(report["left_at_initialisation"]) == set(after) - matching
    assert any(k.startswith("vit_down") for k in report["left_at_initialisation"])
    for key in matching:
        assert torch.equal(after[key], source[key]), key
    for key in set(after) - matching:
        assert torch.equal(after[key], before[key]), key


def test_a_source_that_matches_nothing_is_one_line(unet_run, tmp_path):
    from safetensors.torch import save_file

    data, _ = unet_run
    foreign = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(3, 3)}, str(foreign))
    code, _, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", "--model", "lvit", *TINY,
                            "--init-from", foreign])
    assert_one_line_error(code, err, "other.safetensors", "no part of this model matches")
    assert not (tmp_path / "run").exists()  # a failed start leaves no run folder behind
    code, _, err = run_cli(["train", "--data", data, "--out", tmp_path / "run2", *TINY, "--init-from",
                            tmp_path / "missing"])
    assert_one_line_error(code, err, "missing")


def test_init_from_is_refused_on_resume(unet_run, tmp_path):
    _, unet = unet_run
    code, _, err = run_cli(["train", "--out", unet, "--resume", "--init-from", unet])
    assert_one_line_error(code, err, "--init-from starts a new run")


def test_a_source_of_another_width_is_refused_though_some_tensors_fit(unet_run, tmp_path):
    """An LViT of another width shares names and, by chance, a few shapes (step counters, small position tensors):
    no part of the network is covered, so it is refused instead of a silent 'partial start'."""
    data, _ = unet_run
    code, _, err = run_cli(["train", "--data", data, "--out", tmp_path / "wide", "--model", "lvit", *TINY,
                            "--epochs", "1", "--set", "model.base_channels=16"])
    assert code == 0, err
    from lvit.models import LViTConfig, build_model
    from lvit.train.init_from import load_matching

    narrow = build_model("lvit", LViTConfig(image_size=32, base_channels=8, vit_heads=4, text_dim=384,
                                            text_tokens=24))
    with pytest.raises(CheckpointError, match="no part of this model matches") as caught:
        load_matching(narrow, tmp_path / "wide")
    matching = int(str(caught.value).split("tensors matching: ")[1].split(" ")[0])
    assert matching > 0  # some tensors did fit by name and shape: the old rule would have started from them
