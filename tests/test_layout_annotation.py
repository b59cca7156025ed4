"""The annotation-file layout (images/{split}/{images,masks} + prompts/annotation.json) on the real QaTa-COV19
sample in ../shared, and check-data on broken copies of it."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from badinputs import assert_one_line_error, run_cli

from lvit.core.errors import DataError
from lvit.data import SegmentationDataset, check_data, detect_layout, load_split, read_image, read_mask
from lvit.data.validate import faults

SIZES = {"train": 32, "val": 8, "test": 24}


@pytest.fixture(scope="module")
def sample(shared_dir) -> Path:
    root = shared_dir / "datasets" / "QaTa-COV19-sample"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    return root


@pytest.fixture
def copy(sample, tmp_path) -> Path:
    """A writable copy of the sample, to break."""
    return Path(shutil.copytree(sample, tmp_path / "qata", ignore=shutil.ignore_patterns(".lvit_cache")))


def annotation(root: Path) -> dict:
    return json.loads((root / "prompts" / "annotation.json").read_text())


def test_records_of_every_split_match_the_annotation_file(sample):
    assert detect_layout(sample) == "annotation"
    entries = annotation(sample)
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        records = load_split(sample, split)
        assert len(records) == SIZES[split] == len(entries[key])
        for record, entry in zip(records, entries[key]):
            assert record.mask_path.name == entry["image_path"]
            assert record.name == entry["image_path"].removeprefix("mask_") == record.image_path.name
            assert record.image_path.parent == sample / "images" / key / "images"
            assert record.text == entry["caption"]
    names = [{r.name for r in load_split(sample, s)} for s in SIZES]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])


def test_images_and_masks_are_real_chest_xrays_with_binary_masks(sample):
    record = load_split(sample, "test")[0]
    image, mask = read_image(record.image_path), read_mask(record.mask_path)
    assert image.shape == (224, 224, 1) and mask.shape == (224, 224)
    assert set(np.unique(mask)) <= {0, 1} and 0 < mask.mean() < 1
    ds = SegmentationDataset(load_split(sample, "val"), 64)
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64) and item["has_mask"]


def test_check_data_accepts_the_sample(sample):
    assert faults(check_data(sample)) == []
    code, out, _ = run_cli(["check-data", sample])
    assert code == 0 and "annotation layout" in out and "train 32, val 8, test 24" in out, out


def test_unused_images_are_a_note_not_a_fault(copy):
    extra = copy / "images" / "test" / "images"
    shutil.copy(next(extra.iterdir()), extra / "not_in_the_file.png")
    problems = check_data(copy)
    assert faults(problems) == []
    assert [(p.path, p.problem, p.note) for p in problems] == [
        ("images/test/images", "1 image(s) that no entry mentions (not used)", True)]
    code, out, _ = run_cli(["check-data", copy])
    assert code == 0 and "note: 1 image(s)" in out
    with pytest.warns(UserWarning, match="1 image.* no entry"):
        assert len(load_split(copy, "test")) == SIZES["test"]


def test_check_data_names_every_fault_of_a_broken_copy(copy):
    entries = annotation(copy)
    missing_mask = entries["train"][0]["image_path"]
    (copy / "images" / "train" / "masks" / missing_mask).unlink()
    entries["valid"].append({"image_path": "mask_ghost.png", "caption": "unilateral pulmonary infection."})
    entries["test"][3]["caption"] = ""
    (copy / "prompts" / "annotation.json").write_text(json.dumps(entries))
    problems = faults(check_data(copy))
    lines = {(p.path, p.problem) for p in problems}
    assert lines == {
        ("prompts/annotation.json", f"train[0] {missing_mask!r}: mask not found in images/train/masks"),
        ("prompts/annotation.json", "valid[8] 'mask_ghost.png': image 'ghost.png' not found in images/valid/images"),
        ("prompts/annotation.json", "valid[8] 'mask_ghost.png': mask not found in images/valid/masks"),
        ("prompts/annotation.json", f"test[3] {entries['test'][3]['image_path']!r}: empty caption"),
    }, problems
    code, out, _ = run_cli(["check-data", copy])
    assert code == 1 and "4 problem(s)" in out
    # Training and testing stop at the first fault, naming the entry.
    with pytest.raises(DataError, match=r"train\[0\]: no mask"):
        load_split(copy, "train")
    with pytest.raises(DataError, match=r"valid\[8\]: no image 'ghost.png'"):
        load_split(copy, "val")


@pytest.mark.parametrize("text, problem", [
    ('{"train": [', r"malformed JSON at line 1 column 12"),
    ('["train"]', r"expected an object of splits at the top level, found list"),
    ('{"train": {"a": 1}}', r"split 'train': expected a list of entries, found dict"),
    ('{"train": [{"caption": "x"}]}', r"train\[0\]: missing or empty 'image_path'"),
    ('{"train": [{"image_path": "../../etc/passwd", "caption": "x"}]}', r"points outside the dataset folder"),
])
def test_a_malformed_annotation_file_is_one_line(copy, text, problem):
    (copy / "prompts" / "annotation.json").write_text(text)
    code, out, _ = run_cli(["check-data", copy])
    assert code == 1
    rows = [line for line in out.splitlines() if line.startswith("prompts/annotation.json")]
    assert rows and any(__import__("re").search(problem, row) for row in rows), out
    code, _, err = run_cli(["train", "--data", copy, "--out", copy.parent / "run", "--model", "lvit-t",
                            "--epochs", "1", "--no-progress"])
    assert_one_line_error(code, err, "annotation.json", problem)


def test_without_a_valid_split_val_is_a_seeded_part_of_train(copy):
    entries = annotation(copy)
    del entries["valid"]
    (copy / "prompts" / "annotation.json").write_text(json.dumps(entries))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, val = load_split(copy, "train", seed=3), load_split(copy, "val", seed=3)
    assert len(train) + len(val) == SIZES["train"] and not {r.name for r in train} & {r.name for r in val}
