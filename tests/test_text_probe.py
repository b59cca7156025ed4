"""The text probe (lvit.evaluate.text_probe): report variants, which reports a variant changes, and the scores of
a tiny trained run under each variant."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvit.core.errors import ConfigError
from lvit.evaluate.text_probe import NO_INFECTION, meaning_changed, probe_reports, variant_reports
from lvit.presets import preset_path
from lvit.train import load_config
from lvit.train.runner import train

BILATERAL = "bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."
LEFT = "unilateral pulmonary infection, one infected area, lower left lung."
UNEVEN = "bilateral pulmonary infection, three infected areas, middle lower left lung and lower right lung."


def test_variants():
    texts = [BILATERAL, LEFT, UNEVEN, "x", "y"]
    assert variant_reports(texts, "true") == texts
    assert variant_reports(texts, "swapped")[1] == LEFT.replace("left", "right")
    assert variant_reports(texts, "no_infection") == [NO_INFECTION] * 5
    shuffled = variant_reports(texts, "shuffled", seed=3)
    assert sorted(shuffled) == sorted(texts) and all(a != b for a, b in zip(shuffled, texts))
    assert shuffled == variant_reports(texts, "shuffled", seed=3) != variant_reports(texts, "shuffled", seed=4)
    with pytest.raises(ValueError, match="unknown report variant"):
        variant_reports(texts, "reversed")


def test_a_swap_that_only_reorders_the_sides_changes_nothing():
    swap = variant_reports([BILATERAL, LEFT, UNEVEN], "swapped")
    assert [meaning_changed("swapped", t, s) for t, s in zip([BILATERAL, LEFT, UNEVEN], swap)] == [False, True, True]
    assert meaning_changed("shuffled", LEFT, LEFT.upper()) is False
    assert meaning_changed("no_infection", LEFT, NO_INFECTION) is True


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    from lvit.data.synthetic import generate_synthetic

    base = tmp_path_factory.mktemp("probe")
    data = generate_synthetic(base / "data", n_train=6, n_val=2, n_test=6, size=64, seed=2, progress=False)
    common = ["model.image_size=32", "model.base_channels=8", "model.vit_heads=4", "data.batch_size=3",
              "trainer.max_epochs=1", "trainer.progress=false", "data.num_workers=0"]
    train(load_config(preset_path("synth"), common), data, base / "lvit")
    train(load_config(preset_path("synth"), common + ["model_name=lvit-t"]), data, base / "lvit-t")
    return data, base / "lvit", base / "lvit-t"


def test_probe_scores_each_variant_and_the_true_one_equals_lvit_test(tiny, tmp_path):
    from lvit.data import load_split
    from lvit.evaluate.testing import run_test

    data, run, _ = tiny
    result = probe_reports(run, data, "test", batch_size=4)
    metrics = run_test(run, data, "test", tmp_path / "t", progress=False, k=0)
    true = result["variants"]["true"]
    assert result["n_images"] == true["n"] == 6
    assert true["dice"] == pytest.approx(metrics["model_resolution"]["mean_over_images"]["dice"], abs=1e-9)
    assert true["pooled_dice"] == pytest.approx(metrics["model_resolution"]["dataset_level"]["dice"], abs=1e-9)
    texts = [r.text for r in load_split(data, "test")]
    swapped = variant_reports(texts, "swapped")
    n_changed = sum(meaning_changed("swapped", t, s) for t, s in zip(texts, swapped))
    assert result["variants"]["swapped"]["changed"]["n"] == n_changed
    assert result["variants"]["no_infection"]["changed"]["n"] == sum(t != NO_INFECTION for t in texts)
    for v in ("swapped", "shuffled", "no_infection"):
        entry = result["variants"][v]
        assert 0 <= entry["dice"] <= 1 and "true_dice" in entry["changed"]


def test_a_model_without_text_has_nothing_to_probe(tiny):
    data, _, run_t = tiny
    with pytest.raises(ConfigError, match="does not read reports"):
        probe_reports(run_t, data)
