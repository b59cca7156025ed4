"""What ``lvit predict`` writes: one image's mask (and probability map, overlay, generated report) or a folder's
``masks/``, ``probs/``, ``overlays/``, ``reports.csv`` and ``skipped.csv``.

Every output is checked before the model loads (a distinct file, never the input, a format its extension names,
new unless ``--force``, writable), and files that an earlier run left and that no longer describe the new masks
(a generated report, a skip list) are removed when the masks are replaced.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, OutputExistsError
from ..core.io import atomic_write_text, check_writable, image_format, refuse_clobber, same_file, save_image, save_png

SKIPPED = "skipped.csv"
REPORTS = "reports.csv"


def report_path_for(mask_path: Path) -> Path:
    """Where a generated report is saved beside the mask: ``mask.png`` -> ``mask.report.txt``."""
    return mask_path.with_name(mask_path.stem + ".report.txt")


def check_image_outputs(image_path: Path, out, prob, overlay, force: bool) -> list[tuple[str, Path, str]]:
    """--out/--prob/--overlay of one image: each a distinct file, none the input, a format its extension names
    (masks and probabilities lossless), not a folder, new unless ``force``, in a writable place.
    -> [(flag, path, format)]"""
    for flag, value in (("--prob", prob), ("--overlay", overlay)):
        if value is True:
            raise ConfigError(f"{flag} needs a file path when predicting one image (e.g. {flag} out.png)")
    wanted = [(flag, Path(value), lossless) for flag, value, lossless in
              (("--out", out, True), ("--prob", prob, True), ("--overlay", overlay, False)) if value]
    seen: dict[Path, str] = {}
    for flag, path, _ in wanted:
        if same_file(path, image_path):
            raise ConfigError(f"{flag} {path}: is the input image; lvit never overwrites its input, even with "
                              "--force: choose another file")
        key = path.resolve()
        if key in seen:
            raise ConfigError(f"{seen[key]} and {flag} both name {path}: give each output its own file")
        seen[key] = flag
    outputs = []
    for flag, path, lossless in wanted:
        if path.is_dir():
            raise OutputExistsError(f"{flag} {path}: is a folder; name the file to write (e.g. {path / 'mask.png'}), "
                                    "or predict a folder of images with --images")
        fmt = image_format(path, lossless=lossless, flag=flag)
        refuse_clobber(path, force)
        check_writable(path)
        outputs.append((flag, path, fmt))
    return outputs


def check_report_output(report_file: Path, image_path: Path, outputs, force: bool) -> None:
    """The file a generated report goes to: not the input nor another output, new unless ``force``, writable."""
    if any(same_file(report_file, p) for p in [image_path, *(p for _, p, _ in outputs)]):
        raise ConfigError(f"{report_file}: the generated report would overwrite another file; rename --out")
    refuse_clobber(report_file, force)
    check_writable(report_file)


def write_image_outputs(outputs, image: np.ndarray, prob: np.ndarray, mask: np.ndarray) -> list[str]:
    """Save one image's mask / probability map / overlay as ``outputs`` names them. -> the paths written."""
    from ..core.overlays import mask_png, overlay, probability_png

    render = {"--out": lambda: mask_png(mask), "--prob": lambda: probability_png(prob),
              "--overlay": lambda: overlay(image, mask)}
    for flag, path, fmt in outputs:
        save_image(path, render[flag](), fmt)
    return [str(p) for _, p, _ in outputs]


def write_or_clear_report(mask_path: Path, image_path: Path, outputs, report: str | None) -> str | None:
    """Save the generated ``report`` beside the mask, or remove one an earlier prediction of this mask left
    (it describes the mask this one replaces). -> a note for the summary line, or None."""
    report_file = report_path_for(mask_path)
    if report is not None:
        atomic_write_text(report_file, report + "\n")
        return f"{report_file} (generated report)"
    if report_file.is_file() and not any(report_file == p for _, p, _ in outputs) and report_file != image_path:
        report_file.unlink()
        return f"{report_file} removed (a report generated for the mask this one replaces)"
    return None


def check_folder_output(out: Path, images: Path) -> None:
    """--out of a folder prediction must not be (or hold as masks/ probs/ overlays/) the --images folder."""
    for sub in ("", "masks", "probs", "overlays"):
        if same_file(out / sub, images):
            raise ConfigError(f"--out {out}: {'it' if not sub else sub + '/ in it'} is the --images folder: the "
                              "predictions would mix with (or overwrite) the input images; choose another folder")


def save_folder_prediction(out: Path, stem: str, image: np.ndarray, prob: np.ndarray, mask: np.ndarray,
                           with_prob: bool, with_overlay: bool) -> None:
    """``out/masks/STEM.png`` (and ``probs/``, ``overlays/`` when asked)."""
    from ..core.overlays import mask_png, overlay, probability_png

    save_png(out / "masks" / f"{stem}.png", mask_png(mask))
    if with_prob:
        save_png(out / "probs" / f"{stem}.png", probability_png(prob))
    if with_overlay:
        save_png(out / "overlays" / f"{stem}.png", overlay(image, mask))


def _csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows(rows)
    return buf.getvalue()


def write_folder_lists(out: Path, skipped, failed, generated, writer_folder: Path | None) -> Path:
    """``out/skipped.csv`` (images not predicted and why) and ``out/reports.csv`` (generated reports), each
    removed when there is nothing to list: an earlier run's list describes other masks. -> the skip list's path."""
    listing = out / SKIPPED
    if skipped or failed:
        rows = [["image", "status", "reason"]]
        rows += [[name, status, why] for status, items in (("skipped", skipped), ("failed", failed))
                 for name, why in items]
        atomic_write_text(listing, _csv(rows))
    else:
        listing.unlink(missing_ok=True)
    if generated:
        rows = [["image", "report", "source"]] + [[name, text, f"generated by {writer_folder}"]
                                                  for name, text in generated]
        atomic_write_text(out / REPORTS, _csv(rows))
    else:
        (out / REPORTS).unlink(missing_ok=True)
    return listing
