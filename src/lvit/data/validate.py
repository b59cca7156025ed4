"""``lvit check-data``: read every file of a dataset once and list ALL problems, not just the first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .layout import (
    DEFAULT_IMAGE_COLUMN,
    DEFAULT_TEXT_COLUMN,
    IMAGE_DIR,
    MASK_DIR,
    SPLITS,
    find_table,
    garbled,
    index_folder,
    match_row,
    read_table,
    safe_child,
    split_folder,
    stem_index,
)
from .readers import is_binary_mask, read_array


@dataclass(frozen=True)
class Problem:
    path: str  # relative to the dataset root where possible
    problem: str


def _rel(path: Path, root: Path) -> str:
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return str(path)
    return str(path) if rel == Path(".") else str(rel)


def check_data(
    root: str | Path,
    image_column: str = DEFAULT_IMAGE_COLUMN,
    text_column: str = DEFAULT_TEXT_COLUMN,
    progress: bool = False,
) -> list[Problem]:
    """All problems of the dataset at ``root`` (empty list: the dataset is fine)."""
    from tqdm import tqdm

    root = Path(root)
    problems: list[Problem] = []

    def add(path, problem: str) -> None:
        problems.append(Problem(_rel(Path(path), root), problem))

    if not root.is_dir():
        return [Problem(str(root), "dataset folder not found")]
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
                add(folder / IMAGE_DIR / image, "missing mask" + ("" if masks else f" (no {MASK_DIR}/ folder or it is empty)"))
            pairs.append((image, mask))
        matched_images = {i for i, _ in pairs if i}
        matched_masks = {m for _, m in pairs if m}
        if table_ok:  # an unreadable table is one problem, not one per image
            for name in sorted(set(images) - matched_images):
                add(folder / IMAGE_DIR / name, "image without report")
            for name in sorted(set(masks) - matched_masks):
                add(folder / MASK_DIR / name, "mask without a report row")
        # Pixels: every image and mask is read exactly once.
        sizes: dict[str, tuple[int, int]] = {}
        for name in tqdm(images, desc=f"check {folder.name}/img", disable=not progress, unit="img"):
            try:
                sizes[name] = read_array(images[name]).shape[:2]
            except DataError as exc:
                add(images[name], exc.problem)
        for image, mask in tqdm(pairs, desc=f"check {folder.name}/{MASK_DIR}", disable=not progress, unit="mask"):
            if mask is None:
                continue
            try:
                arr = read_array(masks[mask])
            except DataError as exc:
                add(masks[mask], exc.problem)
                continue
            if image in sizes and arr.shape[:2] != sizes[image]:
                (h, w), (ih, iw) = arr.shape[:2], sizes[image]
                add(masks[mask], f"mask size {w}x{h} differs from image size {iw}x{ih}")
            if not is_binary_mask(arr):
                add(masks[mask], "non-binary mask values (expected 0/255 or 0/1)")
    return problems


def format_problems(problems: list[Problem]) -> str:
    """A two-column text table: file | problem."""
    if not problems:
        return ""
    width = min(max(len(p.path) for p in problems), 70)
    lines = [f"{'file':<{width}}  problem", f"{'-' * width}  {'-' * 40}"]
    lines += [f"{p.path:<{width}}  {p.problem}" for p in problems]
    return "\n".join(lines)
