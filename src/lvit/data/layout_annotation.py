"""The annotation-file layout: one JSON file lists every split's (mask, report) entries.

::

    <root>/images/{train,valid,test}/images/<name>.png
    <root>/images/{train,valid,test}/masks/mask_<name>.png
    <root>/prompts/annotation.json    {"train": [entry, ...], "valid": [...], "test": [...]}
    entry: {"image_path": "mask_<name>.png", "caption": "<report>", ...}   (other keys are kept out of lvit)

This is how the public cleaned copy of LViT's QaTa-COV19 split is laid out (ShuchangYe-bib/SGSeg,
``data/QaTa/``). ``image_path`` names the MASK, as the official spreadsheets' ``Image`` column does; the image
is the same name without ``mask_``. lvit's split "val" is the file's "valid". Images that no entry mentions are
not used; check-data counts them as a note (in that copy all 2,810 of them are byte-identical copies of
annotated images whose names differ only in letter case).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..core.errors import DataError
from .records import Record, check_pixels, garbled, index_folder, safe_child

ANNOTATION_FILE = Path("prompts") / "annotation.json"
SPLIT_KEYS = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}
MASK_PREFIX = "mask_"


def annotation_json(data: dict) -> str:
    """The annotation file's text as QaTa's copy writes it: two-space indent, short number lists on one line."""
    import re

    text = json.dumps(data, indent=2, ensure_ascii=False)
    text = re.sub(r"\[\s+((?:-?\d+(?:\.\d+)?,\s+)*-?\d+(?:\.\d+)?)\s+\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    return text + "\n"


def write_annotation(root: Path, data: dict) -> Path:
    """Write ``root/prompts/annotation.json`` (``{split key: [{"image_path": mask name, "caption": report}]}``,
    the layout's one index of images and reports), atomically. -> its path."""
    from ..core.io import atomic_write_text

    path = Path(root) / ANNOTATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, annotation_json(data))


def detect(root: Path) -> bool:
    return (root / ANNOTATION_FILE).is_file() or (root / "images").is_dir() and (root / "prompts").is_dir()


def _split_key(entries: dict, split: str) -> str | None:
    return next((k for k in SPLIT_KEYS[split] if k in entries), None)


def _folder(root: Path, key: str) -> Path:
    return root / "images" / key


def read_annotation(root: Path) -> dict[str, list]:
    """The parsed annotation file: split key -> list of entries. DataError for a missing, unreadable,
    malformed or wrongly shaped file (one line naming the file and, for JSON errors, the line and column)."""
    path = root / ANNOTATION_FILE
    if not path.is_file():
        raise DataError(path, "annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(path, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except OSError as exc:
        raise DataError(path, f"unreadable ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise DataError(path, f"expected an object of splits at the top level, found {type(data).__name__}")
    for key, entries in data.items():
        if not isinstance(entries, list):
            raise DataError(path, f"split {key!r}: expected a list of entries, found {type(entries).__name__}")
    return data


def has_split(root: Path, split: str) -> bool:
    try:
        return _split_key(read_annotation(root), split) is not None
    except DataError:
        return split != "val"  # let the reader report the fault; an unreadable file has no known val split


def _entry_fields(entry, where: str, path: Path) -> tuple[str, str | None]:
    """(mask name, caption or None) of one entry; DataError naming the entry when it is not an entry."""
    if not isinstance(entry, dict):
        raise DataError(path, f"{where}: expected an object with image_path and caption, found {type(entry).__name__}")
    name = entry.get("image_path")
    if not isinstance(name, str) or not name.strip():
        raise DataError(path, f"{where}: missing or empty 'image_path'")
    caption = entry.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise DataError(path, f"{where}: 'caption' is not text")
    caption = " ".join(caption.split()) if caption else None
    return name.strip(), caption or None


def _image_name(mask_name: str) -> str:
    return mask_name[len(MASK_PREFIX):] if mask_name.startswith(MASK_PREFIX) else mask_name


def records(root: Path, split: str, *, require_masks: bool = True, **_official_only) -> list[Record]:
    """The records of one split in file order; DataError for the first fault (check-data lists all).
    ``image_column`` / ``text_column`` / ``table`` of the official layout do not apply and are ignored."""
    path = root / ANNOTATION_FILE
    data = read_annotation(root)
    key = _split_key(data, split)
    if key is None:
        raise DataError(path, f"no {' or '.join(repr(k) for k in SPLIT_KEYS[split])} split in the file")
    folder = _folder(root, key)
    images, masks = index_folder(folder / "images"), index_folder(folder / "masks")
    if not images:
        raise DataError(folder / "images", "no images found")
    out, seen = [], {}
    for i, entry in enumerate(data[key]):
        where = f"{key}[{i}]"
        name, caption = _entry_fields(entry, where, path)
        safe_child(folder / "masks", name, path)
        if name in seen:
            raise DataError(path, f"{where}: duplicate entry {name!r} (also {key}[{seen[name]}])")
        seen[name] = i
        if caption is None:
            raise DataError(path, f"{where}: empty caption for {name!r}")
        image = _image_name(name)
        if image not in images:
            raise DataError(path, f"{where}: no image {image!r} in images/{key}/images (run lvit check-data)")
        if name not in masks and require_masks:
            raise DataError(path, f"{where}: no mask {name!r} in images/{key}/masks (run lvit check-data)")
        out.append(Record(image, images[image], masks.get(name), caption))
    unused = len(set(images) - {r.name for r in out})
    if unused:  # not fatal: such images are simply not part of the split
        warnings.warn(f"{folder / 'images'}: {unused} image(s) that no entry of {ANNOTATION_FILE} mentions "
                      "are not used", stacklevel=4)
    return out


def check(root: Path, add, *, progress: bool = False, **_official_only) -> None:
    """Every problem of an annotation-layout dataset, each passed to ``add(path, problem, note=False)``."""
    path = root / ANNOTATION_FILE
    try:
        data = read_annotation(root)
    except DataError as exc:
        add(exc.path, exc.problem)
        return
    if _split_key(data, "train") is None and _split_key(data, "test") is None:
        add(path, "no 'train' or 'test' split in the file")
    for split in ("train", "val", "test"):
        key = _split_key(data, split)
        if key is None:
            continue
        folder = _folder(root, key)
        images, masks = index_folder(folder / "images"), index_folder(folder / "masks")
        if not images:
            add(folder / "images", "no images found")
        seen: dict[str, int] = {}
        pairs: list[tuple[str | None, Path | None]] = []
        for i, entry in enumerate(data[key]):
            where = f"{key}[{i}]"
            try:
                name, caption = _entry_fields(entry, where, path)
                safe_child(folder / "masks", name, path)
            except DataError as exc:
                add(path, exc.problem if exc.problem.startswith(where) else f"{where}: {exc.problem}")
                continue
            where = f"{where} {name!r}"
            if name in seen:
                add(path, f"{where}: duplicate entry (also {key}[{seen[name]}])")
                continue
            seen[name] = i
            if caption is None:
                add(path, f"{where}: empty caption")
            elif garbled(caption):
                add(path, f"{where}: garbled text (wrong encoding or control characters)")
            image = _image_name(name)
            if image not in images:
                add(path, f"{where}: image {image!r} not found in images/{key}/images")
            if name not in masks:
                add(path, f"{where}: mask not found in images/{key}/masks")
            pairs.append((image if image in images else None, masks.get(name)))
        used = {i for i, _ in pairs if i}
        unused = sorted(set(images) - used)
        if unused:
            lower = {name.lower() for name in used}
            case_variants = sum(name.lower() in lower for name in unused)
            why = (f"; {case_variants} of them differ from a used image's name only in letter case"
                   if case_variants else "")
            add(folder / "images", f"{len(unused)} image(s) that no entry mentions (not used{why})", note=True)
        check_pixels({n: images[n] for n in sorted(used)}, pairs, add, progress=progress, desc=f"{key}")
