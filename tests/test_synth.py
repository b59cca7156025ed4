"""The embedded synthetic dataset: layout, determinism, mask/report alignment, text dependence."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from lvit.commands.cli import main  # noqa: E402  (the real CLI entry point: one-line errors, exit 2)
from lvit.data import (
    generate_synthetic,
    load_split,
    make_case,
    parse_report,
    read_image,
    read_mask,
    zone_at,
)
from lvit.data.synthetic import NORMAL_REPORT, report_for


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = generate_synthetic(tmp_path / "a", 3, 1, 1, size=48, seed=7, progress=False)
    b = generate_synthetic(tmp_path / "b", 3, 1, 1, size=48, seed=7, progress=False)
    c = generate_synthetic(tmp_path / "c", 3, 1, 1, size=48, seed=8, progress=False)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 3 * 2 + 2 + 2 + 3 + 2  # images + masks, 3 tables, DATASHEET.md, synth_meta.json
    assert fa == fb
    key_a = next(k for k in fa if k.name == "train_0000.png")
    key_c = next(k for k in fc if k.name == "train_0000.png")
    assert fa[key_a] != fc[key_c]


def test_official_layout_and_naming(tiny_synth):
    for folder, n in (("Train_Folder", 12), ("Val_Folder", 4), ("Test_Folder", 4)):
        assert len(list((tiny_synth / folder / "img").glob("*.png"))) == n
        assert all(p.name.startswith("mask_") for p in (tiny_synth / folder / "labelcol").iterdir())
    import pandas as pd

    table = pd.read_excel(tiny_synth / "Train_Folder" / "Train_text.xlsx")
    assert list(table.columns) == ["Image", "Description"]
    assert table["Image"].str.startswith("mask_").all()  # official: the Image column holds the MASK name
    assert (tiny_synth / "DATASHEET.md").read_text().startswith("# Datasheet")


def test_round_trip_counts_shapes_ranges_and_alignment(tiny_synth):
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        records = load_split(tiny_synth, split)
        assert len(records) == n
        for r in records:
            image, mask = read_image(r.image_path), read_mask(r.mask_path)
            assert image.shape == (64, 64, 1) and image.dtype == np.uint8 and image.max() > image.min()
            assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 1}
            _assert_mask_matches_report(mask, r.text)


def _assert_mask_matches_report(mask: np.ndarray, report: str) -> None:
    """Each connected lesion lies in a zone the report names, and each named zone holds a lesion."""
    named = parse_report(report)
    labels, n = ndimage.label(mask)
    found = set()
    for cy, cx in ndimage.center_of_mass(mask, labels, range(1, n + 1)):
        zone = zone_at(cy, cx, mask.shape[0])
        assert zone in named, f"lesion in {zone} not in report {report!r}"
        found.add(zone)
    assert found == named, f"report {report!r} names {named - found} without a lesion"
    assert (n == 0) == (report == NORMAL_REPORT)


def test_alignment_and_text_dependence_at_full_size():
    cases = [make_case(3, "train", i, 224) for i in range(40)]
    for case in cases:
        _assert_mask_matches_report((case.mask > 127).astype(np.uint8), case.report)
        assert 2 <= len(case.lesion_zones) + len(case.distractor_zones) <= 4
        if case.lesion_zones:  # abnormal: always at least one distractor, so the image alone is ambiguous
            assert case.distractor_zones
    assert any(not c.lesion_zones for c in cases), "normal cases are included"
    assert any(len({s for _, s in c.lesion_zones}) == 2 for c in cases), "bilateral cases are included"


def test_report_style():
    assert report_for([("upper", "left"), ("lower", "right")]) == (
        "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
    )
    assert report_for([("middle", "right")]) == "Unilateral pulmonary infection, one infected area, middle right lung."
    assert report_for([]) == NORMAL_REPORT
    zones = {("upper", "left"), ("lower", "left"), ("middle", "right")}
    assert parse_report(report_for(sorted(zones))) == zones


def test_meta_lists_lesions_and_distractors(tiny_synth):
    meta = json.loads((tiny_synth / "synth_meta.json").read_text())
    case = meta["splits"]["train"][0]
    assert {"image", "mask", "report", "lesion_zones", "distractor_zones"} <= set(case)


def test_cli_synth_and_refuses_to_clobber(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["synth", str(out), "--n-train", "2", "--n-val", "1", "--n-test", "1", "--size", "32"]) == 0
    assert len(load_split(out, "train")) == 2
    assert main(["synth", str(out), "--n-train", "2", "--n-val", "0", "--n-test", "0", "--size", "32"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["synth", str(out), "--n-train", "2", "--n-val", "0", "--n-test", "0", "--size", "32", "--force"]) == 0
    with pytest.raises(SystemExit):
        main(["synth"])
