"""Training-time wording variation (lvit.data.wording) and the report prior (model.report_prior): rules apart from
the test rewording, facts kept, variants drawn by the dataset, the prior's loss and its place in training."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch
from files import load_bench

from lvit.core.errors import ConfigError
from lvit.data import SegmentationDataset, TextTensors
from lvit.data.describe import LEVELS, SIDES, Findings, format_report, parse_findings
from lvit.data.records import Record
from lvit.data.wording import (
    AREA_WORDS,
    DISEASE_WORDS,
    KIND_WORDS,
    LEVEL_WORDS,
    LUNG_WORDS,
    PREAMBLES,
    TRAINING_RULES,
    WORDS,
    vary_wording,
    wording_variants,
)
from lvit.models import LViTConfig, build_model
from lvit.models.blocks import report_prior_loss
from lvit.presets import preset_path
from lvit.train import load_config

ALL_ZONE_SETS = [frozenset(z) for n in range(1, 7) for z in itertools.combinations(
    [(lv, side) for side in SIDES for lv in LEVELS], n)]
TEMPLATE_REPORTS = [format_report(Findings.from_zones(z)) for z in ALL_ZONE_SETS]


def _back_to_template(text: str) -> str:
    """Undo the training rules (the inverse maps written out here, apart from the module's code)."""
    clean = text.lower()
    for preamble in PREAMBLES:
        clean = clean.removeprefix(preamble)
    for level, words in LEVEL_WORDS.items():
        for word in words:
            clean = re.sub(rf"\b{word}\b", level, clean)
    for word in LUNG_WORDS:
        clean = clean.replace(word, "lung")
    for kind, word in KIND_WORDS.items():
        clean = clean.replace(word, kind)
    for word in DISEASE_WORDS:
        clean = re.sub(rf"\b{word}\b", "infection", clean)
    clean = re.sub(r"^(bilateral|unilateral) infection", r"\1 pulmonary infection", clean)
    for singular, plural in AREA_WORDS:
        clean = re.sub(rf"\b{plural}\b", "infected areas", clean)
        clean = re.sub(rf"\b{singular}\b", "infected area", clean)
    clean = clean.replace(" as well as ", " and ")
    return re.sub(r"(lung), (upper|middle|lower)", r"\1 and \2", clean)


def test_every_variant_keeps_sides_count_and_zones():
    rng = np.random.default_rng(0)
    used = set()
    for report in TEMPLATE_REPORTS:
        for _ in range(20):
            variant = vary_wording(report, rng)
            used.add(variant)
            assert parse_findings(_back_to_template(variant)) == parse_findings(report), variant
    assert len(used) > 10 * len(TEMPLATE_REPORTS)  # many wordings, not a handful


def test_reports_outside_the_template_and_no_infection_are_kept():
    rng = np.random.default_rng(0)
    for text in ("no pulmonary infection.", "Nuclei in a dense cluster at the centre.", "",
                 "unilateral pulmonary infection, three infected areas, upper left lung."):  # count != zones named
        assert vary_wording(text, rng) == text
    capitalised = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
    assert any(vary_wording(capitalised, rng) != capitalised for _ in range(5))


def test_training_rules_share_no_rule_and_no_word_with_the_test_rewording():
    rephrase = load_bench("bench/rephrase_reports.py", "rephrase_reports")
    assert not set(TRAINING_RULES) & set(rephrase.RULES)
    rng = np.random.default_rng(1)
    template_words = {w for r in TEMPLATE_REPORTS for w in re.findall(r"[a-z-]+", r)}
    test_words = set()
    for report, _ in itertools.product(TEMPLATE_REPORTS, range(10)):
        test_words |= set(re.findall(r"[a-z-]+", rephrase.rephrase(report, rng)[0].lower()))
    test_new = test_words - template_words
    assert {"opacity", "entire", "mid", "localised"} <= test_new  # the test rules' own words were collected
    train_words = set()
    for report, _ in itertools.product(TEMPLATE_REPORTS, range(10)):
        train_words |= set(re.findall(r"[a-z-]+", vary_wording(report, rng).lower()))
    assert train_words - template_words <= WORDS
    assert not (train_words - template_words) & test_new
    assert not WORDS & test_new


def test_variants_are_seeded():
    texts = TEMPLATE_REPORTS[:20]
    assert wording_variants(texts, 3, seed=4) == wording_variants(texts, 3, seed=4)
    assert wording_variants(texts, 3, seed=4) != wording_variants(texts, 3, seed=5)
    assert [len(v) for v in wording_variants(texts, 3)] == [20, 20, 20]


def test_variants_are_drawn_again_until_they_fit_and_else_keep_the_original():
    texts = TEMPLATE_REPORTS
    short = wording_variants(texts, 2, seed=1, fits=lambda t: len(t) <= len(texts[0]) + 12)
    unbounded = wording_variants(texts, 2, seed=1)
    assert any(len(v) > len(texts[0]) + 12 for copy in unbounded for v in copy)  # the check has work to do
    for copy in short:
        for text, variant in zip(texts, copy):
            assert variant == text or len(variant) <= len(texts[0]) + 12
            assert _back_to_template(variant) == text
    assert wording_variants(texts[:5], 1, fits=lambda t: False) == [texts[:5]]  # nothing fits: own words


def test_training_copies_stay_within_the_models_word_pieces(tmp_path):
    """The training data layer bounds the copies by the run's own tokenizer (MiniLM here, L = 14: tighter than
    a template's 20, so the bound must bite)."""
    from lvit.text import get_text_encoder
    from lvit.text.vocabulary import ReportChecker
    from lvit.train.datamodule import make_dataset

    encoder = get_text_encoder("minilm", max_tokens=14)
    counter = ReportChecker({"text_encoder": encoder.describe()}, None)
    config = load_config(preset_path("synth"), ["text.wording_variants=2", "model.text_tokens=14"])
    from PIL import Image

    records = []
    for k, text in enumerate(TEMPLATE_REPORTS[:12]):
        path = tmp_path / f"{k}.png"
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(path)
        records.append(Record(name=path.name, image_path=path, mask_path=None, text=text))
    seen = []
    from unittest import mock

    import lvit.data.wording as wording

    real = wording.wording_variants

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.extend(v for copy in out for v in copy)
        return out

    with mock.patch.object(wording, "wording_variants", spy):
        make_dataset(records, config, encoder, tmp_path / "cache", augment=True)
    assert len(seen) == 24
    assert all(counter.count_tokens(v) <= 14 or v in TEMPLATE_REPORTS for v in seen)
    assert any(v not in TEMPLATE_REPORTS for v in seen)


# --- the dataset draws a variant half the time ------------------------------------------------------------------


def _dataset(tmp_path, augment):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    records = [Record(name="a.png", image_path=image, mask_path=None, text="r")] * 4
    text = TextTensors(torch.zeros(4, 2, 3), torch.ones(4, 2, dtype=torch.bool), torch.full((4, 2, 3), 9.0),
                       torch.ones(4, 2, dtype=torch.bool))
    variants = [TextTensors(torch.full((4, 2, 3), float(k)), torch.ones(4, 2, dtype=torch.bool),
                            torch.full((4, 2, 3), 10.0 + k), torch.ones(4, 2, dtype=torch.bool)) for k in (1, 2)]
    return SegmentationDataset.from_text(records, 32, text, augment=augment, text_variants=variants)


def test_the_dataset_reads_the_original_half_the_time_and_each_variant_otherwise(tmp_path):
    torch.manual_seed(0)
    data = _dataset(tmp_path, augment=True)
    seen = []
    for _ in range(400):
        item = data[0]
        value = float(item["text"][0, 0])
        seen.append(value - 9.0 if item["flipped"] and value >= 9.0 else value)  # flipped: 9 = original, 10+k
    counts = {v: seen.count(v) for v in set(seen)}
    assert set(counts) == {0.0, 1.0, 2.0}
    assert 160 < counts[0.0] < 240 and 70 < counts[1.0] < 130 and 70 < counts[2.0] < 130
    plain = _dataset(tmp_path, augment=False)
    assert all(float(plain[0]["text"][0, 0]) == 0.0 for _ in range(20))  # no augmentation: the original only


def test_variants_must_match_the_reports_shape(tmp_path):
    with pytest.raises(ValueError, match="shape of text_emb"):
        SegmentationDataset([], 32, torch.zeros(0, 2, 3), text_variants=[TextTensors(torch.zeros(0, 3, 3),
                                                                                      torch.ones(0, 3).bool())])


def test_wording_variants_setting_is_checked():
    for bad in (-1, 17, 1.5, True):
        with pytest.raises(ConfigError, match="wording_variants"):
            load_config(preset_path("synth"), [f"text.wording_variants={bad}"])


# --- the report prior ---------------------------------------------------------------------------------------------

SMALL = dict(image_size=32, base_channels=8, text_dim=16, text_tokens=5, vit_heads=2)


def test_report_prior_loss_by_hand():
    estimate = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])  # [1, 3, 2]
    text = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]]])
    # cosine distances per token: 0, 1, 2
    assert report_prior_loss(estimate, text, None).item() == pytest.approx(1.0)
    assert report_prior_loss(estimate, text, torch.tensor([[True, True, False]])).item() == pytest.approx(0.5)
    assert report_prior_loss(estimate, text, torch.tensor([[False, False, True]])).item() == pytest.approx(2.0)


def test_report_prior_is_checked_and_replaces_the_learned_stand_in():
    with pytest.raises(ConfigError, match="report_prior needs report_dropout"):
        LViTConfig(**SMALL, report_prior=True)
    with pytest.raises(ConfigError, match="report_prior must be"):
        LViTConfig(**SMALL, report_dropout=0.2, report_prior="yes")
    keys = set(build_model("lvit", LViTConfig(**SMALL, report_dropout=0.2, report_prior=True)).state_dict())
    plain = set(build_model("lvit", LViTConfig(**SMALL)).state_dict())
    assert "no_report_text" not in keys
    assert keys - plain and all(k.startswith("report_prior.") for k in keys - plain)


def test_the_no_report_path_reads_the_image_estimate_and_the_aux_loss_only_trains():
    torch.manual_seed(0)
    model = build_model("lvit", LViTConfig(**SMALL, report_dropout=0.3, report_prior=True))
    g = torch.Generator().manual_seed(1)
    image, text = torch.rand(2, 3, 32, 32, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    def bottleneck():
        feats = model.stem(image)
        for down in model.down:
            feats = down(feats)
        return feats

    model.eval()
    with torch.no_grad():
        estimate = model.report_prior(bottleneck())  # [2, 5, 16]
        none = model(image)
        assert torch.allclose(none, model(image, estimate, mask), atol=1e-6)
        mixed = model(image, text, mask, no_report=torch.tensor([True, False]))
        assert torch.allclose(mixed[0], none[0], atol=1e-6) and torch.allclose(mixed[1], model(image, text, mask)[1])
        assert model.forward_with_aux(image, text, mask)[1] == {}  # eval: no training loss
    model.train()  # batch statistics in the CNN: the estimate of this mode
    logits, aux = model.forward_with_aux(image, text, mask)
    assert set(aux) == {"report_prior"}
    expected = report_prior_loss(model.report_prior(bottleneck()), text, mask).item()
    assert aux["report_prior"].item() == pytest.approx(expected, abs=1e-5)
    assert model.forward_with_aux(image)[1] == {}  # no report given: nothing to learn the estimate from


def test_training_adds_the_weighted_prior_loss(monkeypatch):
    from lvit.train.module import SegmentationModule

    config = load_config(preset_path("synth"), ["model.report_dropout=0.3", "model.report_prior=true",
                                                "loss.report_prior_weight=0.5"])
    model = build_model("lvit", LViTConfig(**SMALL, report_dropout=0.3, report_prior=True))
    module = SegmentationModule(model, config)
    batch = {"image": torch.rand(2, 3, 32, 32), "text": torch.randn(2, 5, 16),
             "text_mask": torch.ones(2, 5, dtype=torch.bool), "mask": torch.zeros(2, 1, 32, 32),
             "has_mask": torch.tensor([True, True])}
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    fixed = torch.zeros(2, 1, 32, 32, requires_grad=True)
    monkeypatch.setattr(model, "forward_with_aux", lambda *a: (fixed, {"report_prior": torch.tensor(0.8)}))
    loss = module.training_step(batch, 0)
    expected = module.supervised_loss(fixed, batch["mask"]).item() + 0.5 * 0.8
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    batch["has_mask"] = torch.tensor([False, False])  # no masks: only the prior's term, never a supervised one
    assert module.training_step(batch, 0).item() == pytest.approx(0.4, abs=1e-6)
