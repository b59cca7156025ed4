"""lvit.data: layout and naming conventions, readers, the Dataset, augmentation policy, check-data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from files import write_dicom
from PIL import Image

from lvit.commands.cli import main  # noqa: E402  (the real CLI entry point: one-line errors, exit 2)
from lvit.core.errors import DataError
from lvit.data import (
    AugmentConfig,
    SegmentationDataset,
    check_data,
    load_split,
    read_image,
    read_mask,
    resize_mask,
)


def _write_xlsx(path: Path, rows, columns=("Image", "Description")) -> None:
    pd.DataFrame(rows, columns=list(columns)).to_excel(path, index=False)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def monuseg_like(tmp_path) -> Path:
    """MoNuSeg naming: RGB .tif test images, masks <stem>.png, table Image = mask name."""
    import tifffile

    root = tmp_path / "monuseg"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        folder = root / "Test_Folder"
        (folder / "img").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / "img" / f"TCGA-{i}.tif", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        mask = np.zeros((40, 48), np.uint8)
        mask[5 + i : 20, 10:30] = 255
        _png(folder / "labelcol" / f"TCGA-{i}.png", mask)
        rows.append((f"TCGA-{i}.png", f"The nuclei density in the upper {'left' if i else 'right'} is high."))
    _write_xlsx(root / "Test_Folder" / "Test_text.xlsx", rows)
    return root


def test_monuseg_naming_tif_images_png_masks(monuseg_like):
    records = load_split(monuseg_like, "test")
    assert [r.name for r in records] == ["TCGA-0.tif", "TCGA-1.tif", "TCGA-2.tif"]
    assert records[1].mask_path.name == "TCGA-1.png" and "upper left" in records[1].text
    item = SegmentationDataset(records, 32)[2]
    assert item["image"].shape == (3, 32, 32) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["orig_size"] == (40, 48) and item["has_mask"] and item["name"] == "TCGA-2.tif"


def test_csv_table_and_column_mapping(tiny_synth, tmp_path):
    root = tmp_path / "csv"
    shutil.copytree(tiny_synth, root)
    folder = root / "Test_Folder"
    table = pd.read_excel(folder / "Test_text.xlsx")
    (folder / "Test_text.xlsx").unlink()
    # a user table keyed by IMAGE name, with its own column names
    table = pd.DataFrame({"file": table["Image"].str.removeprefix("mask_"), "report": table["Description"]})
    table.to_csv(folder / "Test_text.csv", index=False)
    with pytest.raises(DataError, match="missing column 'Image'"):
        load_split(root, "test")
    records = load_split(root, "test", image_column="file", text_column="report")
    assert len(records) == 4 and all(r.mask_path.name == f"mask_{r.name}" for r in records)
    problems = check_data(root, image_column="file", text_column="report")
    assert [p for p in problems if p.path.startswith("Test_Folder")] == []


def test_seeded_validation_split_without_val_folder(tiny_synth, tmp_path):
    root = tmp_path / "noval"
    shutil.copytree(tiny_synth, root)
    shutil.rmtree(root / "Val_Folder")
    train, val = load_split(root, "train", seed=1), load_split(root, "val", seed=1)
    assert len(val) == 2 and len(train) == 10  # 20 % of 12
    assert not {r.name for r in train} & {r.name for r in val}
    assert [r.name for r in load_split(root, "val", seed=1)] == [r.name for r in val]
    assert len(load_split(root, "val", val_fraction=0.5)) == 6


def test_path_traversal_is_refused(tiny_synth, tmp_path):
    root = tmp_path / "evil"
    shutil.copytree(tiny_synth, root)
    table = root / "Test_Folder" / "Test_text.xlsx"
    rows = pd.read_excel(table).values.tolist()
    rows[0][0] = "../../etc/passwd"
    _write_xlsx(table, rows)
    with pytest.raises(DataError, match="outside the dataset folder"):
        load_split(root, "test")
    assert any("outside the dataset folder" in p.problem for p in check_data(root))


def test_readers_convert_bit_depth_channels_and_formats(tmp_path):
    gray16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 40 + 1000).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    img = read_image(tmp_path / "g16.png")
    assert img.shape == (32, 32, 1) and img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    _png(tmp_path / "rgba.png", rgba)
    assert read_image(tmp_path / "rgba.png").shape == (20, 20, 3)
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "x.jpg")
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(tmp_path / "x.bmp")
    assert read_image(tmp_path / "x.jpg").shape == (20, 20, 3) and read_image(tmp_path / "x.bmp").shape == (20, 20, 1)

    import nibabel as nib

    vol = np.zeros((24, 20, 1), np.float32)  # NIfTI (x, y, one slice)
    vol[2, 3, 0] = 5.0
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "s.nii.gz")
    nii = read_image(tmp_path / "s.nii.gz")
    assert nii.shape == (20, 24, 1) and nii[3, 2, 0] == 255  # (rows, cols) = (y, x)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32) + np.arange(3), np.eye(4)), tmp_path / "v.nii")
    with pytest.raises(DataError, match="2-D"):
        read_image(tmp_path / "v.nii")

    write_dicom(tmp_path / "x.dcm", (np.arange(24 * 20).reshape(24, 20) * 7).astype(np.uint16), "MONOCHROME1")
    dcm = read_image(tmp_path / "x.dcm")
    assert dcm.shape == (24, 20, 1) and dcm[0, 0, 0] == 255 and dcm[-1, -1, 0] == 0  # MONOCHROME1 inverted

    m = np.zeros((20, 20), np.uint8)
    m[:5], m[5:10] = 255, 100  # 100 is below the 8-bit threshold (> 127)
    _png(tmp_path / "m.png", m)
    assert read_mask(tmp_path / "m.png").sum() == 100
    _png(tmp_path / "m01.png", (m > 0).astype(np.uint8))  # 0/1 masks are taken as they are
    assert read_mask(tmp_path / "m01.png").sum() == 200


def test_unreadable_files_raise_data_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        read_image(tmp_path / "empty.png")
    _png(tmp_path / "ok.png", np.zeros((40, 40), np.uint8) + 9)
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        read_image(tmp_path / "cut.png")
    _png(tmp_path / "tiny.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="absurd image size"):
        read_image(tmp_path / "tiny.png")
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "nope.png")


def test_dataset_items_text_and_bad_file(tiny_synth, tmp_path):
    records = load_split(tiny_synth, "train")[:3]
    emb, tmask = torch.randn(3, 10, 8), torch.ones(3, 10, dtype=torch.bool)
    ds = SegmentationDataset(records, 32, emb, tmask, in_channels=1)
    item = ds[1]
    assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert torch.equal(item["text"], emb[1]) and item["text_mask"].dtype == torch.bool and item["index"] == 1
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 1, 32, 32) and batch["text"].shape == (3, 10, 8)

    root = tmp_path / "bad"
    shutil.copytree(tiny_synth, root)
    bad = load_split(root, "train")[:2]
    bad[0].image_path.write_bytes(bad[0].image_path.read_bytes()[:100])
    with pytest.raises(DataError, match=f"{bad[0].name}: unreadable or truncated"):
        SegmentationDataset(bad, 32)[0]


def test_hflip_swaps_report_embedding_and_mask(tiny_synth):
    records = load_split(tiny_synth, "train")[:2]
    emb, emb_swapped = torch.zeros(2, 10, 4), torch.ones(2, 10, 4)
    plain = SegmentationDataset(records, 64, emb)[0]
    with pytest.raises(ValueError, match="text_emb_flipped"):
        SegmentationDataset(records, 64, emb, augment=AugmentConfig(hflip_prob=1.0))
    flip_only = AugmentConfig(affine_prob=0, intensity_prob=0, hflip_prob=1.0)
    ds = SegmentationDataset(records, 64, emb, augment=flip_only, text_emb_flipped=emb_swapped)
    item = ds[0]
    assert item["flipped"] and torch.equal(item["text"], emb_swapped[0])
    assert torch.equal(item["mask"], plain["mask"].flip(-1))
    assert AugmentConfig().hflip_prob == 0.0  # off by default: a flip swaps left and right lung


def test_augmentation_is_seeded_and_keeps_masks_binary(tiny_synth):
    records = load_split(tiny_synth, "train")[:1]
    ds = SegmentationDataset(records, 64, augment=AugmentConfig(affine_prob=1.0, intensity_prob=1.0))
    torch.manual_seed(0)
    a = ds[0]
    torch.manual_seed(0)
    b = ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert set(a["mask"].unique().tolist()) <= {0.0, 1.0} and 0 <= a["image"].min() and a["image"].max() <= 1


def test_resize_mask_nearest_and_official():
    mask = torch.zeros(1, 10, 10)
    mask[:, 2:5, 2:5] = 1
    near = resize_mask(mask, 20)
    assert near.sum() == 36 and set(near.unique().tolist()) == {0.0, 1.0}
    assert resize_mask(mask, 20, "official").sum() >= near.sum()  # bilinear then > 0 grows objects


def test_check_data_clean_and_cli(tiny_synth, capsys):
    assert check_data(tiny_synth) == []
    assert main(["check-data", str(tiny_synth)]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_data_finds_every_planted_fault(tiny_synth, tmp_path, capsys):
    root = tmp_path / "broken"
    shutil.copytree(tiny_synth, root)
    train = root / "Train_Folder"
    img, lab = train / "img", train / "labelcol"
    data = (img / "train_0000.png").read_bytes()
    (img / "train_0000.png").write_bytes(data[: len(data) // 3])  # truncated
    (img / "train_0001.png").write_bytes(b"")  # zero bytes
    (lab / "mask_train_0002.png").unlink()  # missing mask
    _png(lab / "mask_train_0003.png", np.zeros((32, 32), np.uint8))  # size differs
    _png(lab / "mask_train_0004.png", np.full((64, 64), 77, np.uint8))  # non-binary
    _png(img / "extra.png", np.zeros((64, 64), np.uint8))  # image without report
    (img / "train_0005.png").unlink()  # report without image
    _png(img / "train_0006.bmp", np.zeros((64, 64), np.uint8))  # duplicate name (same stem)
    _png(img / "train_0007.png", np.zeros((8, 8), np.uint8))  # absurd size
    rows = pd.read_excel(train / "Train_text.xlsx").values.tolist()
    rows[8][1] = "   "  # empty report
    rows[9][1] = "Bilateral pulmonary infection, caf\u00c3\u00a9 lung."  # garbled (mojibake)
    rows.append(list(rows[10]))  # duplicate row
    _write_xlsx(train / "Train_text.xlsx", rows)
    _write_xlsx(root / "Val_Folder" / "Val_text.xlsx", [("mask_val_0000.png", "x")], columns=("Image", "Report"))

    problems = check_data(root)
    found = {(p.path, p.problem.split(" (")[0]) for p in problems}
    text = "\n".join(f"{p.path} | {p.problem}" for p in problems)
    expected = [
        ("Train_Folder/img/train_0000.png", "unreadable or truncated image"),
        ("Train_Folder/img/train_0001.png", "empty file"),
        ("Train_Folder/img/train_0002.png", "missing mask"),
        ("Train_Folder/labelcol/mask_train_0003.png", "mask size 32x32 differs from image size 64x64"),
        ("Train_Folder/labelcol/mask_train_0004.png", "non-binary mask values"),
        ("Train_Folder/img/extra.png", "image without report"),
        ("Train_Folder/Train_text.xlsx", "row 7: 'mask_train_0005.png': report without image"),
        ("Train_Folder/img/train_0006.bmp", "duplicate name: train_0006.bmp, train_0006.png share the stem"),
        ("Train_Folder/img/train_0007.png", "absurd image size 8x8"),
        ("Train_Folder/Train_text.xlsx", "row 10: 'mask_train_0008.png': empty report"),
        ("Train_Folder/Train_text.xlsx", "row 11: 'mask_train_0009.png': garbled text"),
        ("Train_Folder/Train_text.xlsx", "row 14: 'mask_train_0010.png': duplicate name"),
        ("Val_Folder/Val_text.xlsx", "missing column 'Description'"),
    ]
    for item in expected:
        assert any(path == item[0] and problem.startswith(item[1]) for path, problem in found), f"{item}\n{text}"
    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out
    assert "problem(s) found" in out and "train_0000.png" in out


def test_real_monuseg_tif_png_and_xlsx(shared_dir):
    root = shared_dir / "datasets" / "MoNuSeg"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    test = load_split(root, "test")
    assert len(test) == 14 and test[0].image_path.suffix == ".tif" and test[0].mask_path.name.endswith(".png")
    assert len(load_split(root, "train")) == 24 and len(load_split(root, "val")) == 6
    item = SegmentationDataset(test[:1], 64)[0]
    assert item["image"].shape == (3, 64, 64) and item["orig_size"] == (1000, 1000)
    assert 0.05 < item["mask"].mean() < 0.6 and set(item["mask"].unique().tolist()) == {0.0, 1.0}


def test_in_memory_cache_and_mapping_back_to_original_size(tiny_synth, tmp_path):
    from lvit.data import to_original_size

    root = tmp_path / "mem"
    shutil.copytree(tiny_synth, root)
    records = load_split(root, "test")[:1]
    ds = SegmentationDataset(records, 32, cache_in_memory=True)
    first = ds[0]
    records[0].image_path.unlink()  # a cached item is not read again
    second = ds[0]
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["mask"], second["mask"])
    back = to_original_size(first["mask"][None], first["orig_size"])  # [1, 1, 64, 64]
    assert back.shape == (1, 1, 64, 64)
    original = torch.from_numpy(read_mask(records[0].mask_path)).float()
    if original.sum() > 0:  # nearest down then bilinear up: most of the lesion is recovered
        assert ((back[0, 0] > 0.5).float() * original).sum() >= 0.5 * original.sum()


def test_non_utf8_csv_is_reported(tiny_synth, tmp_path):
    root = tmp_path / "latin1"
    shutil.copytree(tiny_synth, root)
    folder = root / "Test_Folder"
    table = pd.read_excel(folder / "Test_text.xlsx")
    (folder / "Test_text.xlsx").unlink()
    table.loc[0, "Description"] = "Opacit\u00e9 upper left lung."
    (folder / "Test_text.csv").write_bytes(table.to_csv(index=False).encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_split(root, "test")
    assert any(p.path == "Test_Folder/Test_text.csv" and "not UTF-8" in p.problem for p in check_data(root))


def test_images_without_report_are_skipped_with_a_warning(tiny_synth, tmp_path):
    root = tmp_path / "orphan"
    shutil.copytree(tiny_synth, root)
    _png(root / "Test_Folder" / "img" / "zz_extra.png", np.zeros((64, 64), np.uint8))
    with pytest.warns(UserWarning, match="1 image\\(s\\) without a report"):
        records = load_split(root, "test")
    assert len(records) == 4 and "zz_extra.png" not in {r.name for r in records}
