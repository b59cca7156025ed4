"""The bad-input corpus: broken or unusual files, generated from code into a copy of a good dataset.

Each :class:`BadInput` corrupts ONE thing in a dataset in the official layout (``Train_Folder/img``,
``labelcol``, ``Train_text.xlsx``) and says what lvit must do with it:

* ``valid=False``: the data is wrong. Every entry point (``lvit check-data``, ``lvit train``, ``lvit predict``)
  must stop with one line that names the offending file (``culprit``) and matches ``problem``;
* ``valid=True``: unusual but legal data (16-bit PNG, RGBA, a non-binary mask, odd Unicode): it must work.

The corpus is code rather than committed binaries so each case can be read (and extended) here, and so the
files always match the current synthetic dataset. ``tests/test_reliability_inputs.py`` runs it; so does
``bench/reliability.py`` (which records the counts in bench/RESULTS.md).
"""

from __future__ import annotations

import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

TRAIN = "Train_Folder"
VICTIM = "train_0000.png"  # the sample every case corrupts
VICTIM_MASK = f"mask_{VICTIM}"


@dataclass(frozen=True)
class BadInput:
    name: str
    what: str  # one line, for reports
    make: Callable[[Path], Path]  # corrupts the dataset at root; returns the file at fault
    valid: bool = False  # True: legal data that must be handled, not refused
    problem: str = ""  # regex the error / check-data line must match (invalid cases)
    level: str = "file"  # "file": found when a sample is read; "table": found when the table is read


# --------------------------------------------------------------------------------------------------
# Helpers


def image_path(root: Path) -> Path:
    return root / TRAIN / "img" / VICTIM


def mask_path(root: Path) -> Path:
    return root / TRAIN / "labelcol" / VICTIM_MASK


def table_path(root: Path) -> Path:
    return root / TRAIN / "Train_text.xlsx"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header_size(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims ``width x height`` 8-bit gray but holds ~no pixel data.

    Decoding it would allocate ``width * height`` bytes (10 GB for 100000 x 100000): a reader must refuse it
    from the header alone.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def _save(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")


def _rewrite_table(root: Path, edit: Callable, suffix: str = ".xlsx", encoding: str = "utf-8") -> Path:
    """Load Train_text.xlsx, apply ``edit(DataFrame) -> DataFrame``, write it back as ``suffix``."""
    import pandas as pd

    table = table_path(root)
    df = edit(pd.read_excel(table, dtype=object))
    if suffix == ".xlsx":
        df.to_excel(table, index=False)
        return table
    table.unlink()  # a CSV replaces the spreadsheet
    out = table.with_suffix(suffix)
    out.write_bytes(df.to_csv(index=False).encode(encoding))
    return out


def _set_report(root: Path, text: str) -> Path:
    def edit(df):
        df.loc[df["Image"] == VICTIM_MASK, "Description"] = text
        return df

    return _rewrite_table(root, edit)


# --------------------------------------------------------------------------------------------------
# The cases


def truncated_png(root: Path) -> Path:
    path = image_path(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def zero_byte_image(root: Path) -> Path:
    path = image_path(root)
    path.write_bytes(b"")
    return path


def text_as_image(root: Path) -> Path:
    path = image_path(root)
    path.write_text("Patient 0000: no image here, this is a note that was saved as .png\n")
    return path


def png_16bit(root: Path) -> Path:
    path = image_path(root)
    gray = _read_rgb(path).mean(axis=-1)
    _save(path, (gray * 257).astype(np.uint16))  # 16-bit grayscale ("I;16")
    return path


def png_rgba(root: Path) -> Path:
    path = image_path(root)
    rgb = _read_rgb(path)
    alpha = np.full(rgb.shape[:2] + (1,), 200, np.uint8)
    _save(path, np.concatenate([rgb, alpha], axis=-1))
    return path


def huge_dimensions(root: Path) -> Path:
    path = image_path(root)
    path.write_bytes(png_with_header_size(100_000, 100_000))  # 10 G pixels: PIL's decompression-bomb guard
    return path


def oversized_side(root: Path) -> Path:
    path = image_path(root)
    path.write_bytes(png_with_header_size(40_000, 20))  # under PIL's bomb limit, over lvit's 16384 px/side
    return path


def mask_other_size(root: Path) -> Path:
    path = mask_path(root)
    from PIL import Image

    with Image.open(path) as im:
        im.resize((im.width // 2, im.height // 2), Image.NEAREST).save(path, format="PNG")
    return path


def mask_non_binary(root: Path) -> Path:
    path = mask_path(root)
    from PIL import Image

    with Image.open(path) as im:
        mask = np.array(im.convert("L"))
    ramp = np.linspace(0, 255, mask.shape[1], dtype=np.float32)[None, :].repeat(mask.shape[0], 0)
    _save(path, ramp.astype(np.uint8))  # a soft (probability-like) mask: 0..255 gradient
    return path


def whitespace_report(root: Path) -> Path:
    return _set_report(root, " \t \n  ")


def latin1_csv(root: Path) -> Path:
    def edit(df):
        df.loc[df["Image"] == VICTIM_MASK, "Description"] = "Opacité basale droite, deux zones infectées."
        return df

    return _rewrite_table(root, edit, suffix=".csv", encoding="latin-1")


def mojibake_xlsx(root: Path) -> Path:
    # UTF-8 text once decoded as Latin-1 ("Ã©" for "é") and saved that way: garbled, flagged by check-data.
    return _set_report(root, "OpacitÃ© basale droite, deux zones infectÃ©es, lower right lung.")


def unicode_xlsx(root: Path) -> Path:
    # Legal odd characters: accents, CJK, emoji, a non-breaking space. Must train like any other report.
    return _set_report(root, "Opacité basale droite\u00a0— 右下肺 two infected areas 🫁, lower right lung.")


def missing_column(root: Path) -> Path:
    return _rewrite_table(root, lambda df: df.drop(columns=["Description"]))


def path_traversal(root: Path) -> Path:
    def edit(df):
        df.loc[df["Image"] == VICTIM_MASK, "Image"] = "../../../../../../etc/passwd"
        return df

    return _rewrite_table(root, edit)


CORPUS: list[BadInput] = [
    BadInput("truncated_png", "PNG cut in half", truncated_png, problem="truncated|unreadable"),
    BadInput("zero_byte", "0-byte image file", zero_byte_image, problem="empty file"),
    BadInput("text_as_image", "a text file named .png", text_as_image, problem="unreadable"),
    BadInput("png_16bit", "16-bit grayscale PNG", png_16bit, valid=True),
    BadInput("png_rgba", "RGBA PNG (alpha channel)", png_rgba, valid=True),
    BadInput("huge_dimensions", "PNG header claims 100000x100000", huge_dimensions,
             problem="too large|absurd image size|decompression"),
    BadInput("oversized_side", "PNG header claims 40000x20", oversized_side,
             problem="too large|absurd image size"),
    BadInput("mask_other_size", "mask half the image's size", mask_other_size, problem="differs from image size"),
    BadInput("mask_non_binary", "soft 0..255 gradient mask", mask_non_binary, problem="non-binary",
             valid=True),  # training binarises at 127 (documented); check-data still flags it
    BadInput("whitespace_report", "report of only whitespace", whitespace_report, problem="empty report",
             level="table"),
    BadInput("latin1_csv", "CSV table saved as Latin-1", latin1_csv, problem="not UTF-8", level="table"),
    BadInput("mojibake_xlsx", "xlsx cell with mojibake (Ã©)", mojibake_xlsx, problem="garbled",
             valid=True, level="table"),  # readable text: training uses it; check-data flags it
    BadInput("unicode_xlsx", "xlsx cell with accents, CJK, emoji, NBSP", unicode_xlsx, valid=True,
             level="table"),
    BadInput("missing_column", "table without the Description column", missing_column,
             problem="missing column 'Description'", level="table"),
    BadInput("path_traversal", "table names ../../etc/passwd", path_traversal,
             problem="outside the dataset folder", level="table"),
]

# Cases check-data must report even though training handles them (suspicious but usable data).
FLAGGED_BY_CHECK_DATA = {"mask_non_binary", "mojibake_xlsx"}


def make_case(case: BadInput, good_root: Path, dest: Path) -> tuple[Path, Path]:
    """Copy the dataset at ``good_root`` to ``dest`` and apply ``case``: (dataset root, file at fault)."""
    shutil.copytree(good_root, dest, ignore=shutil.ignore_patterns(".lvit_cache"))
    return dest, case.make(dest)


# --------------------------------------------------------------------------------------------------
# Running the CLI and counting outcomes (shared by the reliability tests and bench/reliability.py)

COUNTS_ENV = "LVIT_RELIABILITY_COUNTS"  # a JSON file the reliability tests add their counts to


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``lvit ARGV`` in this process: (exit code, stdout, stderr). An escaping exception is a test failure."""
    import contextlib
    import io

    from lvit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list[str]:
    """The ``error: ...`` lines of a CLI's stderr (tqdm bars and warnings may share the stream)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_one_line_error(code: int, stderr: str, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line, no traceback; the line contains every needle (regex). -> the line."""
    import re

    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1, (code, stderr)
    for needle in needles:
        assert re.search(needle, lines[0]), (needle, lines[0])
    return lines[0]


def half_written_files(folder: Path) -> list[Path]:
    """Temporary files of lvit.io and files that do not load completely (PNG, safetensors, ckpt, json)."""
    bad = []
    if not folder.exists():
        return bad
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.endswith(".tmp"):
            bad.append(path)
        elif not file_is_complete(path):
            bad.append(path)
    return bad


def file_is_complete(path: Path) -> bool:
    """True when ``path`` parses completely with the reader of its type (types lvit writes)."""
    import json

    try:
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                im.load()
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path))
        elif path.suffix == ".ckpt":
            import torch

            torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            yaml.safe_load(path.read_text(encoding="utf-8"))
        elif path.suffix == ".csv":
            import csv

            rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
            return bool(rows) and all(len(r) == len(rows[0]) for r in rows)
    except Exception:  # noqa: BLE001 - any parse failure means "not complete"
        return False
    return True


class Tally:
    """Counts of a test module (e.g. bad inputs tried / handled, faults injected / survived)."""

    def __init__(self, section: str):
        from collections import Counter

        self.section = section
        self.counts: Counter = Counter()

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def line(self) -> str:
        return f"reliability[{self.section}]: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))

    def report(self, request) -> None:
        """Print the counts on the terminal (past pytest's output capture) and add them to the JSON file."""
        self.dump()
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        capture = request.config.pluginmanager.getplugin("capturemanager")
        if reporter is None:
            return
        if capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line("\n" + self.line())
        else:
            reporter.write_line(self.line())

    def dump(self) -> None:
        """Merge the counts into the JSON file named by $LVIT_RELIABILITY_COUNTS (if set)."""
        import json
        import os

        target = os.environ.get(COUNTS_ENV)
        if not target:
            return
        path = Path(target)
        data = json.loads(path.read_text()) if path.is_file() else {}
        section = data.setdefault(self.section, {})
        for key, value in self.counts.items():
            section[key] = section.get(key, 0) + value
        from lvit.io import atomic_write_json

        atomic_write_json(path, data)
