"""``lvit describe``: reports written from masks (the rule, the template parser, the dataset form)."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from badinputs import assert_one_line_error, run_cli

from lvit.core.errors import DataError
from lvit.data import load_split, read_mask
from lvit.data.describe import (
    ZONES,
    Findings,
    Rule,
    band_edges,
    describe_mask,
    format_report,
    mask_findings,
    named_zones,
    parse_findings,
    zone_pixel_counts,
)
from lvit.data.describe_dataset import describe_dataset
from lvit.data.synthetic import parse_report, report_for

S = 224  # QaTa-COV19's mask size: the upper zone ends at row 72, the middle one at row 81


def blank(h: int = S, w: int = S) -> np.ndarray:
    return np.zeros((h, w), np.uint8)


def blob(mask: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], value: int = 255) -> np.ndarray:
    mask[rows[0]:rows[1], cols[0]:cols[1]] = value
    return mask


# --- the rule on hand-made masks ------------------------------------------------------------------------------


def test_one_blob_in_the_upper_left_lung():
    mask = blob(blank(), (20, 60), (30, 80))  # image left = "left lung", as in LViT's reports
    assert describe_mask(mask) == "unilateral pulmonary infection, one infected area, upper left lung."
    assert mask_findings(mask) == Findings(1, 1, frozenset({("upper", "left")}))


def test_two_blobs_on_both_sides():
    mask = blob(blob(blank(), (20, 60), (30, 80)), (150, 200), (140, 200))
    assert describe_mask(mask) == ("bilateral pulmonary infection, two infected areas, upper left lung and "
                                   "lower right lung.")
    assert describe_mask(mask, capitalize=True).startswith("Bilateral pulmonary infection, two infected areas")


def test_three_blobs_in_one_lung_one_per_zone():
    mask = blank()
    for rows in ((10, 50), (70, 83), (150, 190)):  # 70-83 lies mostly in the middle band (rows 72-80)
        blob(mask, rows, (140, 190))
    assert describe_mask(mask) == "unilateral pulmonary infection, three infected areas, upper middle lower right lung."


def test_three_blobs_in_one_zone_are_one_infected_area():
    """QaTa's convention: the number of infected areas is the number of zones named, not of blobs."""
    mask = blank()
    for cols in ((10, 30), (45, 65), (80, 100)):
        blob(mask, (150, 190), cols)
    assert describe_mask(mask) == "unilateral pulmonary infection, one infected area, lower left lung."


def test_empty_mask_and_tiny_lesions():
    assert describe_mask(blank()) == "no pulmonary infection."
    assert describe_mask(blank(), capitalize=True) == "No pulmonary infection."
    assert mask_findings(blank()) == Findings(0, 0, frozenset())
    # A lesion below the zone minimum (0.4 % of the image) still names the zone that holds it ...
    tiny = blob(blank(), (180, 185), (150, 155))
    assert describe_mask(tiny) == "unilateral pulmonary infection, one infected area, lower right lung."
    # ... but a few pixels spilling into another zone or lung do not name it.
    spill = blob(blob(blank(), (100, 200), (20, 100)), (100, 104), (112, 116))
    assert describe_mask(spill) == "unilateral pulmonary infection, one infected area, lower left lung."


def test_mask_encodings_and_sizes_agree():
    mask = blob(blob(blank(), (20, 60), (30, 80)), (150, 200), (140, 200))
    expected = describe_mask(mask)
    assert describe_mask(mask > 0) == describe_mask((mask > 0).astype(np.uint8)) == expected
    assert describe_mask(np.stack([mask] * 3, -1)) == expected  # an RGB mask
    big = np.kron(mask, np.ones((3, 2), np.uint8))  # 672 x 448: the bands and minimum scale with the image
    assert describe_mask(big) == expected
    with pytest.raises(ValueError, match="H x W"):
        describe_mask(np.zeros((2, 3, 4, 5)))


@pytest.mark.parametrize("rows, levels", [
    ((0, 72), "upper"), ((72, 81), "middle"), ((81, 224), "lower"), ((60, 100), "upper middle lower"),
    ((78, 200), "lower"),  # 3 rows x 60 px = 180 px in the middle band: under the 0.4 % minimum (201 px)
    ((40, 80), "upper middle"),
])
def test_zone_boundaries(rows, levels):
    mask = blob(blank(), rows, (130, 190))
    n = len(levels.split())
    assert describe_mask(mask) == (f"unilateral pulmonary infection, {['one', 'two', 'three'][n - 1]} infected "
                                   f"area{'s' if n > 1 else ''}, {levels} right lung.")


def test_band_edges_and_counts():
    assert band_edges(224) == (72, 81)
    assert band_edges(100, Rule(0.5, 0.5, 0.0)) == (50, 50)
    counts = zone_pixel_counts(blob(blank(), (0, 224), (0, 1)))  # one full-height column at the left edge
    assert counts.tolist() == [[72, 9, 143], [0, 0, 0]]
    with pytest.raises(ValueError):
        Rule(0.5, 0.4)


# --- the template: writer and parser --------------------------------------------------------------------------


def test_every_zone_set_round_trips_through_the_template():
    for n in range(len(ZONES) + 1):
        for zones in itertools.combinations(ZONES, n):
            findings = Findings.from_zones(zones)
            for capitalize in (False, True):
                text = format_report(findings, capitalize=capitalize)
                assert parse_findings(text) == findings, text
                assert named_zones(text) == findings.zones
            assert parse_report(report_for(list(zones))) == set(zones)  # the synthetic generator's form


def test_parse_describe_round_trip_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = rng.integers(40, 300, 2)
        mask = np.zeros((h, w), bool)
        for _ in range(rng.integers(0, 5)):
            y, x = rng.integers(0, h), rng.integers(0, w)
            mask[y:y + rng.integers(1, h // 2 + 2), x:x + rng.integers(1, w // 2 + 2)] = True
        findings = mask_findings(mask)
        assert findings.consistent
        assert parse_findings(describe_mask(mask)) == findings


def test_parser_reads_the_real_template_and_keeps_fields_apart():
    text = ("bilateral pulmonary infection, five infected areas, upper middle lower left lung and "
            "middle lower right lung.")
    findings = parse_findings(text)
    assert (findings.sides, findings.count) == (2, 5)
    assert findings.flags == (1, 1, 1, 0, 1, 1)  # QaTa's pseudo_label order: UL ML LL UR MR LR
    assert findings.to_dict() == {"pulmonary_infection": 2, "infected_area": 5, "pseudo_label": [1, 1, 1, 0, 1, 1]}
    assert Findings.from_flags([1, 1, 1, 0, 1, 1]).report() == text
    assert parse_findings("  Unilateral  pulmonary infection, one infected area, lower right lung") == \
        Findings(1, 1, frozenset({("lower", "right")}))
    odd = parse_findings("bilateral pulmonary infection, two infected areas, lower left lung and "
                         "middle lower right lung.")
    assert odd.count == 2 and len(odd.zones) == 3 and not odd.consistent  # parsed as written
    with pytest.raises(ValueError, match="inconsistent"):
        format_report(odd)
    for bad in ("", "Pneumonia in the left lung.", "bilateral pulmonary infection, two infected areas, upper foo lung.",
                "unilateral pulmonary infection, many infected areas, lower left lung."):
        with pytest.raises(ValueError, match="template"):
            parse_findings(bad)
    assert named_zones("Pneumonia in the upper left lung; nothing else.") == {("upper", "left")}
    assert parse_report("free text") == set()  # the synthetic helper stays lenient


# --- the command, one mask ------------------------------------------------------------------------------------


def test_cli_prints_the_report_of_a_mask(tmp_path):
    from lvit.core.io import save_png

    path = save_png(tmp_path / "m.png", blob(blank(), (20, 60), (30, 80)))
    code, out, err = run_cli(["describe", path])
    assert code == 0 and out == "unilateral pulmonary infection, one infected area, upper left lung.\n", err
    code, out, _ = run_cli(["describe", "--json", path])
    assert json.loads(out)["pseudo_label"] == [1, 0, 0, 0, 0, 0]
    code, _, err = run_cli(["describe"])
    assert_one_line_error(code, err, "MASK file")
    code, _, err = run_cli(["describe", tmp_path / "missing.png"])
    assert_one_line_error(code, err, "missing.png")
    code, _, err = run_cli(["describe", path, "--overwrite"])
    assert_one_line_error(code, err, "--overwrite")


# --- the dataset form -----------------------------------------------------------------------------------------


def _rewrite_xlsx(path: Path, rows: list[tuple[str, str | None]]) -> None:
    from openpyxl import Workbook

    wb = Workbook()
    wb.active.append(["Image", "Description", "Reader"])
    for key, text in rows:
        wb.active.append([key, text, "dr. x"])
    wb.save(path)


def _records(root: Path, split: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_split(root, split)


def test_dataset_form_official_layout_fills_what_is_missing_and_keeps_the_rest(tiny_synth, tmp_path):
    root = Path(shutil.copytree(tiny_synth, tmp_path / "synth"))
    train = root / "Train_Folder" / "Train_text.xlsx"
    original = {r.mask_path.name: r.text for r in _records(root, "train")}
    names = sorted(original)
    # Rows 0-5 kept (row 1 with an empty report), rows 6-11 missing; the Test table is gone altogether.
    _rewrite_xlsx(train, [(n, None if i == 1 else original[n]) for i, n in enumerate(names[:6])])
    before = train.read_bytes()
    (root / "Test_Folder" / "Test_text.xlsx").unlink()

    reports = {r.split: r for r in describe_dataset(root)}
    assert (reports["train"].added, reports["train"].filled, reports["train"].kept) == (6, 1, 5)
    assert reports["train"].backup == train.with_name("Train_text.xlsx.bak")
    assert reports["train"].backup.read_bytes() == before  # the user's table, byte for byte
    assert reports["test"].created and reports["test"].added == 4 and reports["test"].backup is None
    assert not reports["val"].changed and not reports["val"].written

    records = {r.mask_path.name: r for r in _records(root, "train")}
    assert sorted(records) == names  # every mask has a report lvit reads back
    for i, name in enumerate(names):
        expected = (original[name] if i < 6 and i != 1
                    else describe_mask(read_mask(records[name].mask_path), capitalize=True))
        assert records[name].text == expected
    import pandas as pd

    assert pd.read_excel(train)["Reader"].tolist()[:6] == ["dr. x"] * 6  # other columns kept
    assert len(_records(root, "test")) == 4

    # Nothing left to do: nothing written, no new backup.
    again = describe_dataset(root, ["train"])
    assert not again[0].changed and not again[0].written
    assert not train.with_name("Train_text.xlsx.bak1").exists()


def test_dataset_form_overwrite_replaces_reports_with_a_backup(tiny_synth, tmp_path):
    root = Path(shutil.copytree(tiny_synth, tmp_path / "synth"))
    table = root / "Val_Folder" / "Val_text.xlsx"
    rows = [(r.mask_path.name, r.text) for r in _records(root, "val")]
    _rewrite_xlsx(table, [(rows[0][0], "Lesions everywhere, in my words."), *rows[1:]])
    table.with_name("Val_text.xlsx.bak").write_bytes(b"an older backup")
    before = table.read_bytes()
    kept = describe_dataset(root, ["val"])[0]  # without --overwrite: every report kept, nothing written
    assert (kept.kept, kept.written) == (4, False) and table.read_bytes() == before
    dry = describe_dataset(root, ["val"], overwrite=True, dry_run=True)[0]
    assert dry.replaced >= 1 and not dry.written and table.read_bytes() == before
    report = describe_dataset(root, ["val"], overwrite=True)[0]
    assert report.replaced == dry.replaced and report.replaced + report.kept == 4
    for record in _records(root, "val"):
        assert record.text == describe_mask(read_mask(record.mask_path), capitalize=True)
    assert report.backup == table.with_name("Val_text.xlsx.bak1")  # the older backup is not touched
    assert report.backup.read_bytes() == before
    assert table.with_name("Val_text.xlsx.bak").read_bytes() == b"an older backup"


def test_dataset_form_csv_table_keeps_its_columns(tiny_synth, tmp_path):
    root = Path(shutil.copytree(tiny_synth, tmp_path / "synth"))
    folder = root / "Test_Folder"
    names = sorted(r.mask_path.name for r in _records(root, "test"))
    (folder / "Test_text.xlsx").unlink()
    (folder / "Test_text.csv").write_text("Image,Description,Note\n" + f"{names[0]},my report,keep me\n",
                                          encoding="utf-8")
    shutil.copy(folder / "img" / names[0].removeprefix("mask_"), folder / "img" / "TEST_0000.png")
    shutil.copy(folder / "labelcol" / names[0], folder / "labelcol" / "mask_TEST_0000.png")  # a case-variant copy
    report = describe_dataset(root, ["test"])[0]
    assert report.duplicates == ["mask_TEST_0000.png"] and report.added == 3
    lines = (folder / "Test_text.csv").read_text(encoding="utf-8").splitlines()
    assert lines[:2] == ["Image,Description,Note", f"{names[0]},my report,keep me"] and len(lines) == 5
    assert [r.text for r in _records(root, "test")][0] == "my report"


def test_dataset_form_broken_mask_changes_nothing(tiny_synth, tmp_path):
    root = Path(shutil.copytree(tiny_synth, tmp_path / "synth"))
    table = root / "Train_Folder" / "Train_text.xlsx"
    before = table.read_bytes()
    (root / "Train_Folder" / "labelcol" / "mask_train_0003.png").write_bytes(b"not a png")
    code, _, err = run_cli(["describe", "--data", root, "--overwrite"])
    assert_one_line_error(code, err, "mask_train_0003.png")
    assert table.read_bytes() == before and not table.with_name("Train_text.xlsx.bak").exists()


@pytest.fixture
def qata_copy(shared_dir, tmp_path) -> Path:
    sample = shared_dir / "datasets" / "QaTa-COV19-sample"
    if not sample.is_dir():
        pytest.skip(f"{sample} is absent")
    return Path(shutil.copytree(sample, tmp_path / "qata", ignore=shutil.ignore_patterns(".lvit_cache")))


def test_dataset_form_annotation_layout_on_the_real_sample(qata_copy):
    root = qata_copy
    path = root / "prompts" / "annotation.json"
    data = json.loads(path.read_text())
    kept = data["test"][:20]
    kept[0] = {**kept[0], "caption": ""}  # an entry without a report
    removed = [e["image_path"] for e in data["test"][20:]]
    data["test"] = kept
    path.write_text(json.dumps(data, indent=2))
    before = path.read_bytes()
    # The public copy also holds byte-identical copies named with different letter case: not new samples.
    folder = root / "images" / "test"
    twin = kept[1]["image_path"]
    upper = twin.replace("sub-s", "sub-S")
    assert upper != twin
    shutil.copy(folder / "masks" / twin, folder / "masks" / upper)
    shutil.copy(folder / "images" / twin.removeprefix("mask_"), folder / "images" / upper.removeprefix("mask_"))

    code, out, err = run_cli(["describe", "--data", root, "--split", "test"])
    assert code == 0, err
    assert "4 report(s) added" in out and "1 report(s) filled" in out and "19 report(s) kept" in out
    assert f"1 case-variant duplicate(s) of described masks skipped (e.g. {upper})" in out
    assert path.with_name("annotation.json.bak").read_bytes() == before

    after = json.loads(path.read_text())
    assert after["train"] == data["train"] and after["valid"] == data["valid"]
    entries = {e["image_path"]: e for e in after["test"]}
    assert set(removed) <= set(entries) and upper not in entries
    for entry in after["test"][1:20]:
        assert entry == next(e for e in data["test"] if e["image_path"] == entry["image_path"])
    folder = root / "images" / "test" / "masks"
    for name in [kept[0]["image_path"], *removed]:
        entry = entries[name]
        assert entry["caption"] == describe_mask(read_mask(folder / name))  # lower case, as the file's reports
        fields = {k: entry[k] for k in ("pulmonary_infection", "infected_area", "pseudo_label")}
        assert parse_findings(entry["caption"]).to_dict() == fields
    records = _records(root, "test")
    assert len(records) == 24 and all(parse_findings(r.text) for r in records)


def test_dataset_form_refuses_what_it_cannot_do(tiny_synth, tmp_path):
    root = Path(shutil.copytree(tiny_synth, tmp_path / "synth"))
    shutil.rmtree(root / "Val_Folder")
    with pytest.raises(DataError, match="split folder not found"):
        describe_dataset(root, ["val"])
    with pytest.raises(DataError, match="not found"):
        describe_dataset(tmp_path / "nowhere")
    table = root / "Train_Folder" / "Train_text.xlsx"
    _rewrite_xlsx(table, [])
    from openpyxl import load_workbook

    wb = load_workbook(table)
    wb.active["B1"] = "Report"
    wb.save(table)
    with pytest.raises(DataError, match="missing column 'Description'"):
        describe_dataset(root, ["train"])
    assert describe_dataset(root, ["train"], text_column="Report")[0].added == 12
