"""``lvit describe --data ROOT``: write a report for every mask of a dataset, in its layout's own table.

* official layout: each split folder's report table (``Train_text.xlsx`` / ``.csv``, columns ``Image`` = mask
  file name and ``Description``; other columns, sheets and rows are kept). A split without a table gets a new
  ``<Split>_text.xlsx``.
* annotation layout: ``prompts/annotation.json``; an entry per mask (``image_path``, ``caption`` and QaTa's
  structured fields ``pulmonary_infection``, ``infected_area``, ``pseudo_label``); other keys are kept.

Without ``overwrite`` every existing report is kept and only masks without one get a report (rows/entries
added, empty cells filled); with it every report of a mask is replaced by the rule's. A table that exists is
never changed without a backup: its bytes are first copied to ``<name>.bak`` (``.bak1``, ``.bak2``, ... when
taken). Nothing is written when nothing changes, or with ``dry_run``. Masks without an image are skipped
(load_split would refuse such a row) and counted; so are masks without a report whose name differs only in
letter case from a mask that has one (the public QaTa-COV19 copy holds about 1,600 such byte-identical
copies, ``mask_sub-S...`` beside ``mask_sub-s...``: describing them would duplicate samples).
Reports are written in the table's own style: capitalised
when most existing reports are (the official spreadsheets), lower case when most are not (annotation.json);
an empty table: capitalised for the official layout, lower case for the annotation layout.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import DataError
from ..core.io import atomic_write_bytes
from . import layout_annotation as ann
from . import layout_official as off
from .describe import DEFAULT_RULE, Rule, format_report, mask_findings
from .layout import SPLIT_NAMES, detect_layout
from .readers import read_mask
from .records import index_folder, safe_child


@dataclass
class SplitReport:
    """What :func:`describe_dataset` did (or, with ``dry_run``, would do) to one split's table."""

    split: str
    table: Path
    created: bool = False  # the table did not exist
    masks: int = 0  # masks with an image
    added: int = 0  # rows / entries added
    filled: int = 0  # existing rows / entries whose empty report was filled
    replaced: int = 0  # existing reports replaced by a different one (overwrite)
    kept: int = 0  # existing reports left as they were
    skipped: list[str] = field(default_factory=list)  # masks without an image
    duplicates: list[str] = field(default_factory=list)  # masks without a report named like one with a report
    backup: Path | None = None
    written: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.added or self.filled or self.replaced)

    def summary(self, root: Path) -> str:
        where = _relative(self.table, root)
        parts = [f"{self.masks} mask(s)"]
        for n, what in ((self.added, "added"), (self.filled, "filled"), (self.replaced, "replaced"),
                        (self.kept, "kept")):
            if n:
                parts.append(f"{n} report(s) {what}")
        if self.skipped:
            parts.append(f"{len(self.skipped)} mask(s) without an image skipped (e.g. {self.skipped[0]})")
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} case-variant duplicate(s) of described masks skipped "
                         f"(e.g. {self.duplicates[0]})")
        if not self.changed:
            state = "nothing to change"
        elif self.written:
            state = "new table written" if self.created else f"written (previous table kept as {self.backup.name})"
        else:
            state = "dry run: nothing written"
        return f"{self.split}: {where}: {', '.join(parts)}; {state}"


def describe_dataset(
    root: str | Path,
    splits: list[str] | None = None,
    *,
    overwrite: bool = False,
    dry_run: bool = False,
    rule: Rule = DEFAULT_RULE,
    image_column: str = off.DEFAULT_IMAGE_COLUMN,
    text_column: str = off.DEFAULT_TEXT_COLUMN,
) -> list[SplitReport]:
    """Write a report for every mask of the dataset at ``root`` (see module doc); one :class:`SplitReport` per
    split. ``splits`` (train | val | test) defaults to every split the dataset has. Every mask is read before
    anything is written, so a broken mask (DataError naming it) leaves every table as it was."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    for split in splits or ():
        if split not in SPLIT_NAMES:
            raise DataError(root, f"unknown split {split!r} (use train, val or test)")
    layout = detect_layout(root)
    if layout == "annotation":
        plans = _annotation_plans(root, splits, overwrite, rule)
    else:
        plans = _official_plans(root, splits, overwrite, rule, image_column, text_column)
    reports = []
    for report, write in plans:
        if report.changed and not dry_run:
            write(report)
            report.written = True
        reports.append(report)
    return reports


# --- official layout ------------------------------------------------------------------------------------------


class _Table:
    """An official report table held so that it can be written back with everything else in it unchanged."""

    def __init__(self, path: Path, image_column: str, text_column: str):
        self.path, self.exists = path, path.is_file()
        self.kind = path.suffix.lower()
        self.image_column, self.text_column = image_column, text_column
        self.bom = False
        if self.kind == ".xls":
            raise DataError(path, "lvit cannot write the old .xls format; save the table as .xlsx or .csv")
        if not self.exists:
            self.header = [image_column, text_column]
            self.rows: list[list] = []
            self.workbook = None
        elif self.kind == ".csv":
            self._read_csv()
        else:
            self._read_xlsx()
        names = [str(h).strip() if h is not None else "" for h in self.header]
        missing = [c for c in (image_column, text_column) if c not in names]
        if missing:
            raise DataError(path, f"missing column {', '.join(repr(m) for m in missing)} (columns: {', '.join(names)})")
        self.key_col, self.text_col = names.index(image_column), names.index(text_column)

    def _read_csv(self):
        raw = self.path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(self.path, f"not UTF-8 text (byte {exc.start}); save the CSV as UTF-8") from None
        self.bom = raw.startswith(b"\xef\xbb\xbf")
        table = list(csv.reader(io.StringIO(text, newline="")))
        if not table:
            raise DataError(self.path, "empty file (no header row)")
        self.header, self.rows = table[0], [list(r) for r in table[1:]]
        self.workbook = None

    def _read_xlsx(self):
        from openpyxl import load_workbook

        try:
            self.workbook = load_workbook(self.path)
        except Exception as exc:  # noqa: BLE001 - openpyxl raises many types for broken files
            raise DataError(self.path, f"unreadable report table ({type(exc).__name__}: {exc})") from None
        sheet = self.workbook.worksheets[0]  # the sheet pandas (and so load_split) reads
        values = [list(r) for r in sheet.iter_rows(values_only=True)]
        if not values:
            raise DataError(self.path, "empty spreadsheet (no header row)")
        self.header, self.rows = values[0], values[1:]

    def key(self, i: int) -> str | None:
        row = self.rows[i]
        return off._clean_cell(row[self.key_col]) if self.key_col < len(row) else None

    def text(self, i: int) -> str | None:
        row = self.rows[i]
        return off._clean_cell(row[self.text_col]) if self.text_col < len(row) else None

    def set_text(self, i: int, text: str) -> None:
        row = self.rows[i]
        row.extend([None if self.workbook else ""] * (self.text_col + 1 - len(row)))
        row[self.text_col] = text
        if self.workbook is not None:
            self.workbook.worksheets[0].cell(row=i + 2, column=self.text_col + 1, value=text)

    def append(self, key: str, text: str) -> None:
        width = max(len(self.header), self.key_col + 1, self.text_col + 1)
        row: list = [None if self.workbook else ""] * width
        row[self.key_col], row[self.text_col] = key, text
        self.rows.append(row)
        if self.workbook is not None:
            self.workbook.worksheets[0].cell(row=len(self.rows) + 1, column=self.key_col + 1, value=key)
            self.workbook.worksheets[0].cell(row=len(self.rows) + 1, column=self.text_col + 1, value=text)

    def to_bytes(self) -> bytes:
        if self.kind == ".csv":
            buf = io.StringIO(newline="")
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(self.header)
            writer.writerows(self.rows)
            return (b"\xef\xbb\xbf" if self.bom else b"") + buf.getvalue().encode("utf-8")
        if self.workbook is None:  # a new table: the deterministic writer lvit synth uses
            from .synthetic import xlsx_bytes

            return xlsx_bytes([(r[self.key_col], r[self.text_col]) for r in self.rows],
                              columns=(self.image_column, self.text_column))
        buf = io.BytesIO()
        self.workbook.save(buf)
        return buf.getvalue()


def _official_plans(root, splits, overwrite, rule, image_column, text_column):
    present = [s for s in SPLIT_NAMES if off.split_folder(root, s).is_dir()]
    if splits:
        for split in splits:
            if split not in present:
                raise DataError(off.split_folder(root, split), "split folder not found")
        present = [s for s in present if s in splits]
    if not present:
        raise DataError(root, "no Train_Folder, Val_Folder or Test_Folder (expected the official LViT layout)")
    plans = []
    for split in present:
        folder = off.split_folder(root, split)
        images, masks = index_folder(folder / off.IMAGE_DIR), index_folder(folder / off.MASK_DIR)
        if not masks:
            raise DataError(folder / off.MASK_DIR, "no masks found")
        try:
            path = off.find_table(folder, split)
        except DataError as exc:
            if not str(exc.problem).startswith("no report table"):
                raise
            path = folder / f"{off.SPLITS[split]}_text.xlsx"
        table = _Table(path, image_column, text_column)
        by_stem = off.stem_index(images)
        rows_of: dict[str, list[int]] = {}
        for i in range(len(table.rows)):
            key = table.key(i)
            if key is None:
                continue
            safe_child(folder / off.MASK_DIR, key, path)
            mask = off.match_row(key, images, masks, by_stem)[1]
            if mask is not None:
                rows_of.setdefault(mask, []).append(i)
        existing = [table.text(i) for i in range(len(table.rows)) if table.text(i)]
        capitalize = _capitalised(existing, default=True)
        report = SplitReport(split, path, created=not table.exists)
        described = {name.lower() for name in rows_of}
        for name, mask_path in masks.items():
            image = off.match_row(name, images, masks, by_stem)[0]
            rows = rows_of.get(name, [])
            if image is None:
                report.skipped.append(name)
                continue
            if not rows and name.lower() in described:
                report.duplicates.append(name)
                continue
            report.masks += 1
            if rows and not overwrite and all(table.text(i) for i in rows):
                report.kept += len(rows)
                continue
            text = format_report(mask_findings(read_mask(mask_path), rule), capitalize=capitalize)
            if not rows:
                table.append(name, text)
                report.added += 1
            for i in rows:
                old = table.text(i)
                if old is None:
                    table.set_text(i, text)
                    report.filled += 1
                elif overwrite and old != text:
                    table.set_text(i, text)
                    report.replaced += 1
                else:
                    report.kept += 1
        plans.append((report, lambda rep, table=table: _replace(rep, table.to_bytes())))
    return plans


# --- annotation layout ----------------------------------------------------------------------------------------


def _annotation_plans(root, splits, overwrite, rule):
    path = root / ann.ANNOTATION_FILE
    data = ann.read_annotation(root) if path.exists() else {}
    keys = {}
    for split in SPLIT_NAMES:
        key = ann._split_key(data, split) or next(
            (k for k in ann.SPLIT_KEYS[split] if (ann._folder(root, k) / "masks").is_dir()), None)
        if key is not None and ((ann._folder(root, key) / "masks").is_dir() or key in data):
            keys[split] = key
    if splits:
        for split in splits:
            if split not in keys:
                raise DataError(root / "images", f"no {' or '.join(ann.SPLIT_KEYS[split])} split (folder or entries)")
        keys = {s: k for s, k in keys.items() if s in splits}
    if not keys:
        raise DataError(root / "images", "no train, valid or test folder with masks")
    all_texts = [e.get("caption") for entries in data.values() for e in entries
                 if isinstance(e, dict) and isinstance(e.get("caption"), str) and e["caption"].strip()]
    capitalize = _capitalised(all_texts, default=False)
    reports = []
    for split, key in keys.items():
        folder = ann._folder(root, key)
        images, masks = index_folder(folder / "images"), index_folder(folder / "masks")
        entries = data.setdefault(key, [])
        by_mask: dict[str, list[int]] = {}
        for i, entry in enumerate(entries):
            name, _ = ann._entry_fields(entry, f"{key}[{i}]", path)
            safe_child(folder / "masks", name, path)
            by_mask.setdefault(name, []).append(i)
        report = SplitReport(split, path, created=not path.exists())
        described = {name.lower() for name in by_mask}
        for name, mask_path in masks.items():
            indices = by_mask.get(name, [])
            if ann._image_name(name) not in images:
                report.skipped.append(name)
                continue
            if not indices and name.lower() in described:
                report.duplicates.append(name)
                continue
            report.masks += 1
            captions = [ann._entry_fields(entries[i], f"{key}[{i}]", path)[1] for i in indices]
            if indices and not overwrite and all(captions):
                report.kept += len(indices)
                continue
            findings = mask_findings(read_mask(mask_path), rule)
            text = format_report(findings, capitalize=capitalize)
            if not indices:
                entries.append({"image_path": name, "caption": text, **findings.to_dict()})
                report.added += 1
            for i, old in zip(indices, captions):
                if old is None:
                    report.filled += 1
                elif overwrite and old != text:
                    report.replaced += 1
                else:
                    report.kept += 1
                    continue
                entries[i]["caption"] = text
                entries[i].update(findings.to_dict())
        reports.append(report)
    if not any(r.changed for r in reports):
        return [(r, None) for r in reports]
    state = {"done": None}

    def write(rep: SplitReport) -> None:  # one file for every split: write it once, name one backup
        if state["done"] is None:
            state["done"] = _replace(rep, ann.annotation_json(data).encode("utf-8"))
        rep.backup = state["done"]

    return [(r, write) for r in reports]


# --- shared ---------------------------------------------------------------------------------------------------


def _capitalised(texts: list[str], default: bool) -> bool:
    """Whether most existing reports start with a capital letter (``default`` when there are none)."""
    firsts = [t.strip()[0] for t in texts if t and t.strip() and t.strip()[0].isalpha()]
    if not firsts:
        return default
    return sum(c.isupper() for c in firsts) * 2 > len(firsts)


def _backup_path(path: Path) -> Path:
    candidate = path.with_name(path.name + ".bak")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak{n}")
        n += 1
    return candidate


def _replace(report: SplitReport, data: bytes) -> Path | None:
    """Write a table atomically, first copying an existing one to a fresh backup; returns the backup path."""
    path = report.table
    backup = None
    if path.is_file():
        backup = _backup_path(path)
        atomic_write_bytes(backup, path.read_bytes())
    atomic_write_bytes(path, data)
    report.backup = backup
    return backup


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


__all__ = ["SplitReport", "describe_dataset"]
