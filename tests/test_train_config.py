"""Presets load onto the dataclasses; overrides, unknown keys and NaN values are handled."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lvit.core.errors import ConfigError
from lvit.presets import preset_path
from lvit.train.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, lr, batch", [("qata", 3e-4, 24), ("mosmed", 1e-3, 24), ("monuseg", 1e-3, 2)])
def test_paper_presets(name, lr, batch):
    cfg = load_config(preset_path(name))
    assert cfg.optim.lr == lr and cfg.data.batch_size == batch
    assert cfg.model.image_size == 224 and cfg.model.text_tokens == 10
    assert cfg.optim.name == "adam" and cfg.optim.t0 == 10 and cfg.optim.eta_min == 1e-4
    assert cfg.trainer.patience == 50
    assert cfg.loss.dice_weight == cfg.loss.bce_weight == 0.5


def test_overrides_and_round_trip():
    cfg = load_config(preset_path("synth"),
                      ["optim.lr=1e-2", "model.base_channels=32", "trainer.devices=2", "optim.grad_clip=1"])
    assert cfg.optim.lr == 0.01 and cfg.model.base_channels == 32 and cfg.trainer.devices == 2
    assert cfg.optim.grad_clip == 1
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("item, needle", [
    ("model.nonsense=3", "unknown key 'nonsense'"),
    ("optimizer.lr=1", "unknown key 'optimizer'"),
    ("optim.lr=nan", "finite"),
    ("optim.lr=inf", "finite"),
    ("data.batch_size=two", "integer"),
    ("trainer.precision=fp8", "precision"),
    ("optim.name=sgd", "adam or adamw"),
    ("model_name=resnet", "model_name"),
    ("optim.lr", "key=value"),
])
def test_bad_overrides(item, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(preset_path("synth"), [item])


def test_eta_min_is_clamped_below_lr():
    assert load_config(None, ["optim.lr=1e-3"]).effective_eta_min == 1e-4
    assert load_config(None, ["optim.lr=5e-5"]).effective_eta_min == pytest.approx(5e-6)


def test_quoted_override_values_stay_strings_and_path_flags_are_quoted():
    from lvit.train.config import apply_override
    from lvit.train.semi_flags import semi_overrides

    data: dict = {}
    for item in ['trainer.init_from="runs/a #1"', 'semi.labeled_list="1e3"', "optim.lr=1e-3"]:
        apply_override(data, item)
    assert data == {"trainer": {"init_from": "runs/a #1"}, "semi": {"labeled_list": "1e3"}, "optim": {"lr": 1e-3}}
    args = argparse.Namespace(labeled_list="on", labeled_fraction=None, semi="epi", beta=None, lv_weight=None,
                              semi_warmup=None, lv_contrast=None)
    assert load_config(None, semi_overrides(args)).semi.labeled_list == "on"


def test_a_semi_setting_without_a_labelled_subset_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="semi.beta is set but semi-supervised training is off"):
        load_config(None, ["semi.beta=0.5"])


@pytest.mark.parametrize("items, needle", [
    (["data.hflip_prob=1.5"], "data.hflip_prob must be a probability"),
    (["data.hflip_prob=-0.1"], "data.hflip_prob must be a probability"),
    (["data.hflip_prob=0.5", "data.augment=false"], "needs data.augment"),
])
def test_hflip_prob_is_checked(items, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(preset_path("synth"), items)


def test_hflip_prob_mirrors_training_images_with_their_reports_swapped(tmp_path):
    """``data.hflip_prob``: the training dataset mirrors an image with that probability and then reads the
    report with left and right swapped (the encoding of the swapped words, not the original's)."""
    import numpy as np
    import torch
    from PIL import Image

    from lvit.data.records import Record
    from lvit.text import encode_cached, get_text_encoder, swap_left_right
    from lvit.train.datamodule import make_dataset

    report = "unilateral pulmonary infection, one infected area, upper left lung."
    image = np.zeros((32, 32), np.uint8)
    image[4:12, 2:10] = 200  # the image's left side, as in the report
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray((image > 0).astype(np.uint8) * 255).save(tmp_path / "a_mask.png")
    records = [Record(name="a.png", image_path=tmp_path / "a.png", mask_path=tmp_path / "a_mask.png", text=report)]
    encoder = get_text_encoder("minilm", max_tokens=14)
    settings = ["model.text_tokens=14", "model.image_size=32", "data.augment=true"]
    flipping = load_config(preset_path("synth"), settings + ["data.hflip_prob=1"])
    plain = load_config(preset_path("synth"), settings)
    item = make_dataset(records, flipping, encoder, tmp_path / "cache", augment=True)[0]
    assert item["flipped"]
    swapped, _ = encode_cached(encoder, [swap_left_right(report)], tmp_path / "cache")
    original, _ = encode_cached(encoder, [report], tmp_path / "cache")
    assert torch.equal(item["text"], swapped[0]) and not torch.equal(item["text"], original[0])
    assert item["mask"][0, :, 16:].sum() > item["mask"][0, :, :16].sum()  # the lesion moved to the other side
    assert not make_dataset(records, plain, encoder, tmp_path / "cache", augment=True)[0]["flipped"]
