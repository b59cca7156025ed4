"""The official LViT dataset layout (as LViT's releases of QaTa-COV19, MosMedData+ and MoNuSeg ship it).

::

    <root>/Train_Folder/img/*        <root>/Train_Folder/labelcol/*     <root>/Train_Folder/Train_text.xlsx
    <root>/Val_Folder/...            (optional: without it a seeded fraction of Train_Folder is held out)
    <root>/Test_Folder/...

The table (``.xlsx`` or ``.csv``) has the official columns ``Image`` (the MASK file name) and
``Description`` (the report); other names can be mapped with ``image_column`` / ``text_column``.
The image of a row is found per dataset: QaTa-COV19 masks are ``mask_<image name>``, MoNuSeg masks are
``<image stem>.png`` (its test images are ``.tif``); a column holding image names also works.
Names in the table must stay inside the dataset folder (``../x`` or absolute paths are refused).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import DataError
from .readers import stem_of
from .records import Record, check_pixels, garbled, index_folder, safe_child, stem_index

SPLITS = {"train": "Train", "val": "Val", "test": "Test"}
IMAGE_DIR, MASK_DIR = "img", "labelcol"
DEFAULT_IMAGE_COLUMN, DEFAULT_TEXT_COLUMN = "Image", "Description"
TABLE_SUFFIXES = (".xlsx", ".xls", ".csv")


@dataclass
class TableRow:
    row: int  # 1-based data row number as a spreadsheet shows it (header = row 1, so first data row = 2)
    key: str  # the image-column cell (mask file name in the official layout)
    text: str | None  # None: empty cell


def split_folder(root: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise DataError(root, f"unknown split {split!r} (use train, val or test)")
    return Path(root) / f"{SPLITS[split]}_Folder"


def find_table(folder: Path, split: str, table: str | Path | None = None) -> Path:
    """``<Split>_text.xlsx`` / ``.csv`` in the split folder, else the only table there."""
    if table is not None:
        path = Path(table)
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise DataError(path, "report table not found")
        return path
    prefix = SPLITS[split]
    for suffix in TABLE_SUFFIXES:
        path = folder / f"{prefix}_text{suffix}"
        if path.is_file():
            return path
    tables = sorted(p for p in folder.glob("*")
                    if p.suffix.lower() in TABLE_SUFFIXES and not p.name.startswith((".", "~$")))
    if len(tables) == 1:
        return tables[0]
    if not tables:
        raise DataError(folder, f"no report table ({prefix}_text.xlsx or {prefix}_text.csv)")
    raise DataError(folder, f"several report tables ({', '.join(t.name for t in tables)}); name one with table=")


def _clean_cell(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and np.isnan(value):
        return None
    text = str(value).strip()
    return text or None


def read_table(
    path: Path, image_column: str = DEFAULT_IMAGE_COLUMN, text_column: str = DEFAULT_TEXT_COLUMN
) -> list[TableRow]:
    """Rows of a report table. Raises DataError for unreadable files, undecodable CSV or missing columns."""
    import pandas as pd

    if not path.is_file():
        raise DataError(path, "report table not found")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    try:
        if path.suffix.lower() == ".csv":
            raw = path.read_bytes()
            try:
                raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise DataError(path, f"not UTF-8 text (byte {exc.start}); save the CSV as UTF-8") from None
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        else:
            df = pd.read_excel(path, dtype=object)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas/openpyxl raise many types for broken files
        raise DataError(path, f"unreadable report table ({type(exc).__name__}: {exc})") from None
    columns = [str(c).strip() for c in df.columns]
    df.columns = columns
    missing = [c for c in (image_column, text_column) if c not in columns]
    if missing:
        raise DataError(path, f"missing column {', '.join(repr(m) for m in missing)} (columns: {', '.join(columns)})")
    rows = []
    for i, (key, text) in enumerate(zip(df[image_column].tolist(), df[text_column].tolist())):
        key = _clean_cell(key)
        if key is None:
            continue  # a blank line in the spreadsheet
        rows.append(TableRow(row=i + 2, key=key, text=_clean_cell(text)))
    return rows


def match_row(
    key: str, images: dict[str, Path], masks: dict[str, Path], images_by_stem: dict[str, list[str]] | None = None
) -> tuple[str | None, str | None]:
    """(image name, mask name) of a table key, trying the official conventions:

    key is a mask name -> ``mask_<image>`` (QaTa-COV19) or ``<image stem>.png`` (MoNuSeg, image any type);
    key is an image name -> mask ``mask_<key>`` or ``<stem>.png`` or the same name.
    """
    if images_by_stem is None:
        images_by_stem = stem_index(images)

    def image_for(mask_name: str) -> str | None:
        bare = mask_name[len("mask_") :] if mask_name.startswith("mask_") else None
        for candidate in (bare, mask_name):
            if candidate and candidate in images:
                return candidate
        for candidate in (bare, mask_name):
            if candidate:
                hits = images_by_stem.get(stem_of(candidate), [])
                if len(hits) == 1:
                    return hits[0]
        return None

    if key in masks or not images.get(key):
        image = image_for(key)
        return image, (key if key in masks else None)
    # The key names an image: find its mask.
    for mask in (f"mask_{key}", f"{stem_of(key)}.png", key, f"mask_{stem_of(key)}.png"):
        if mask in masks:
            return key, mask
    return key, None


def read_split_rows(
    root: str | Path,
    split: str,
    image_column: str = DEFAULT_IMAGE_COLUMN,
    text_column: str = DEFAULT_TEXT_COLUMN,
    table: str | Path | None = None,
):
    """(folder, table path, rows, image index, mask index) of one split folder, without judging them."""
    folder = split_folder(root, split)
    if not folder.is_dir():
        raise DataError(folder, "split folder not found")
    table_path = find_table(folder, split, table)
    rows = read_table(table_path, image_column, text_column)
    return folder, table_path, rows, index_folder(folder / IMAGE_DIR), index_folder(folder / MASK_DIR)


def detect(root: Path) -> bool:
    return any(split_folder(root, s).is_dir() for s in SPLITS)


def has_split(root: Path, split: str) -> bool:
    return split_folder(root, split).is_dir()


def records(
    root: Path,
    split: str,
    *,
    image_column: str = DEFAULT_IMAGE_COLUMN,
    text_column: str = DEFAULT_TEXT_COLUMN,
    table: str | Path | None = None,
    require_masks: bool = True,
) -> list[Record]:
    """The records of one split folder in table order; DataError for the first fault (check-data lists all)."""
    folder, table_path, rows, images, masks = read_split_rows(root, split, image_column, text_column, table)
    if not images:
        raise DataError(folder / IMAGE_DIR, "no images found")
    out, seen = [], {}
    by_stem = stem_index(images)
    for row in rows:
        where = f"{table_path.name} row {row.row}"
        safe_child(folder / MASK_DIR, row.key, table_path)
        if row.key in seen:
            raise DataError(table_path, f"duplicate name {row.key!r} in rows {seen[row.key]} and {row.row}")
        seen[row.key] = row.row
        if row.text is None:
            raise DataError(table_path, f"{where}: empty report for {row.key!r}")
        image, mask = match_row(row.key, images, masks, by_stem)
        if image is None:
            raise DataError(table_path, f"{where}: no image for {row.key!r} in {folder.name}/{IMAGE_DIR} "
                                        "(run lvit check-data)")
        if mask is None and require_masks and masks:
            raise DataError(table_path, f"{where}: no mask for {row.key!r} in {folder.name}/{MASK_DIR}")
        out.append(Record(image, images[image], masks[mask] if mask else None, row.text))
    named = {r.name for r in out}
    orphans = sorted(set(images) - named)
    if orphans:  # not fatal: such images are simply not used (as in the official loader); check-data lists them
        warnings.warn(
            f"{folder / IMAGE_DIR}: {len(orphans)} image(s) without a report are ignored, e.g. {orphans[0]!r} "
            "(run lvit check-data)",
            stacklevel=4,
        )
    return out


def check(root: Path, add, *, image_column: str = DEFAULT_IMAGE_COLUMN,
          text_column: str = DEFAULT_TEXT_COLUMN, progress: bool = False) -> None:
    """Every problem of an official-layout dataset, each passed to ``add(path, problem)``."""
    present = [s for s in SPLITS if split_folder(root, s).is_dir()]
    if "train" not in present and "test" not in present:
        add(root, "no Train_Folder or Test_Folder (expected the official LViT layout)")
    for split in present:
        folder = split_folder(root, split)
        images = index_folder(folder / IMAGE_DIR)
        masks = index_folder(folder / MASK_DIR)
        if not images:
            add(folder / IMAGE_DIR, "no images found")
        by_stem = stem_index(images)
        for names in by_stem.values():
            if len(names) > 1:
                add(folder / IMAGE_DIR / names[0], f"duplicate name: {', '.join(names)} share the stem")
        rows = []
        table, table_ok = None, False
        try:
            table = find_table(folder, split)
            rows = read_table(table, image_column, text_column)
            table_ok = True
        except DataError as exc:
            add(exc.path or folder, exc.problem)
        # Rows: names, reports, matching files.
        first_row: dict[str, int] = {}
        pairs: list[tuple[str | None, str | None]] = []
        for row in rows:
            where = f"row {row.row}: {row.key!r}"
            try:
                safe_child(folder / MASK_DIR, row.key, table)
            except DataError as exc:
                add(table, f"{where}: {exc.problem}")
                continue
            if row.key in first_row:
                add(table, f"{where}: duplicate name (also row {first_row[row.key]})")
                continue
            first_row[row.key] = row.row
            if row.text is None:
                add(table, f"{where}: empty report")
            elif garbled(row.text):
                add(table, f"{where}: garbled text (wrong encoding or control characters)")
            image, mask = match_row(row.key, images, masks, by_stem)
            if image is None:
                add(table, f"{where}: report without image")
            elif mask is None:
                add(folder / IMAGE_DIR / image,
                    "missing mask" + ("" if masks else f" (no {MASK_DIR}/ folder or it is empty)"))
            pairs.append((image, mask))
        matched_images = {i for i, _ in pairs if i}
        matched_masks = {m for _, m in pairs if m}
        if table_ok:  # an unreadable table is one problem, not one per image
            for name in sorted(set(images) - matched_images):
                add(folder / IMAGE_DIR / name, "image without report")
            for name in sorted(set(masks) - matched_masks):
                add(folder / MASK_DIR / name, "mask without a report row")
        check_pixels({n: images[n] for n in images}, [(i, masks[m] if m else None) for i, m in pairs], add,
                     progress=progress, desc=folder.name)
