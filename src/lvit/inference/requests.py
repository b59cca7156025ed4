"""What a prediction is asked for: which images, with which reports (a table, none, or written from the images),
and what to say about the reports before trusting the masks."""

from __future__ import annotations

from pathlib import Path

from .segmenter import MIXED_REPORTS

AUTO = "auto"  # --text / --reports value: always write the report from the image
NO_REPORT_NOTE = "no report given: the mask comes from the model's no-report path (learned with report dropout)"
WRITTEN_MASK_NOTE = (f"the mask averages the model's answers with the writer's {MIXED_REPORTS} most likely reports, "
                     "weighted by how likely each is")


def wants_generated(value: str | None, segmenter=None) -> bool:
    """'auto', or no report for a model without a no-report path: the report writer writes it."""
    if value is None:
        return segmenter is None or not segmenter.has_no_report_path
    return value.strip().lower() == AUTO


def writer_folder_or_error(segmenter, flag: str) -> Path:
    """The report writer a text-guided model uses for images without a report; a one-line error says how to
    get one when there is none (``flag``: how the report could be given instead)."""
    from ..core.errors import ConfigError

    folder = segmenter.report_writer_folder()
    if folder is None:
        raise ConfigError(f"{segmenter.source}: this model reads the report: pass {flag}, or give it a report writer "
                          f"to write one from the image (lvit train-reporter {segmenter.run_dir} --data ROOT, or "
                          "--reporter DIR)")
    return folder


def image_folder(folder: Path) -> dict[str, Path]:
    """The image files of ``--images`` by name; a one-line DataError when there are none."""
    from ..core.errors import DataError
    from ..data.records import index_folder

    if not folder.is_dir():
        raise DataError(folder, "image folder not found" if not folder.exists() else "not a folder (--images)")
    images = index_folder(folder)
    if not images:
        raise DataError(folder, "no image files in this folder")
    return images


def images_and_reports(images: dict[str, Path], folder: Path, table: str | None, image_column: str,
                       text_column: str, reads_text: bool, source, model_name: str):
    """What to predict in a folder: ([(image path, report)], skipped [(name, why)], failed [(name, why)]).

    Without a table (or 'auto') every image, with no report. Images without a row in the table are skipped;
    rows that name no image of the folder, or (text models) hold an empty report, fail; when nothing is left to
    predict, a one-line error. A table that cannot be read at all stops everything (one line).
    """
    from ..core.errors import LvitError

    pairs, skipped, failed = _pairs(images, folder, table, image_column, text_column, reads_text, source, model_name)
    if not pairs:
        reason = (failed or skipped or [("", "nothing to predict")])[0][1]
        raise LvitError(f"{folder}: no image to predict ({len(skipped)} without a report row, {len(failed)} failed; "
                        f"first: {reason})")
    return pairs, skipped, failed


def _pairs(images, folder, table, image_column, text_column, reads_text, source, model_name):
    from ..core.errors import warn
    from ..data.layout_official import match_row, read_table
    from ..data.records import stem_index

    if table is None or wants_generated(table):
        if table is not None and not reads_text:
            warn(f"--reports {table} is ignored: the model of {source} ({model_name}) does not read reports")
        return [(path, None) for path in images.values()], [], []
    table = Path(table)
    if not reads_text:
        warn(f"--reports {table}: the model of {source} ({model_name}) does not read reports; the table only "
             "selects the images to predict")
    pairs, failed, used = [], [], set()
    by_stem = stem_index(images)  # once: per row it made a table of N rows cost N^2
    for row in read_table(table, image_column, text_column):
        name, _ = match_row(row.key, images, {}, by_stem)
        if name is None:
            failed.append((row.key, f"{table}: row {row.row}: no image in {folder} for {row.key!r}"))
            continue
        used.add(name)
        if reads_text and not (row.text and str(row.text).strip()):
            failed.append((name, f"{table}: row {row.row}: empty report for {row.key!r}"))
            continue
        pairs.append((images[name], row.text if reads_text else None))
    skipped = [(name, f"no row in {table}") for name in images if name not in used]
    return pairs, skipped, failed


def warn_about_reports(segmenter, texts: list[str], names: list[str], where: str) -> None:
    """Print :func:`report_warnings` for reports given to a text-guided model."""
    from ..core.errors import warn

    checks = segmenter.checker.check_many(texts) if len(texts) > 1 else [segmenter.checker.check(texts[0])]
    for line in report_warnings(segmenter.checker, checks, names, where):
        warn(line)


def warn_about_skipped(skipped, folder: Path, table, listing: Path) -> None:
    """One warning line naming the images of ``--images`` that have no row in the report table."""
    from ..core.errors import warn

    if skipped:
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        names = ", ".join(name for name, _ in skipped[:5]) + more
        warn(f"{len(skipped)} image(s) in {folder} have no row in {table} and were not predicted: {names} "
             f"(listed in {listing})")


def listed(names: list[str], idx: list[int]) -> str:
    shown = ", ".join(names[i] for i in idx[:5])
    return shown + (f" and {len(idx) - 5} more" if len(idx) > 5 else "")


def report_warnings(checker, checks, names: list[str], where: str) -> list[str]:
    """One warning line per kind of doubt about the reports (truncated, no known words, nothing to check)."""
    lines = []
    single = len(checks) == 1
    cut = [i for i, c in enumerate(checks) if c.truncated]
    if cut:
        c = max((checks[i] for i in cut), key=lambda c: c.tokens)
        if single:
            lines.append(f"{where}: report truncated: the model keeps {c.kept} of its {c.tokens:,} tokens (word "
                         "pieces); the rest is ignored")
        else:
            lines.append(f"{where}: {len(cut)} report(s) truncated to the model's {c.kept} tokens (word pieces), the "
                         f"longest has {c.tokens:,}: {listed(names, cut)}")
    if checker.known_words is None:
        return [*lines, checker.no_record_note()]
    strange = [i for i, c in enumerate(checks) if c.unfamiliar]
    if not strange:
        return lines
    if single:
        c = checks[0]
        what = ("has no words (only symbols or emoji)" if c.words == 0 else
                f"is far from the training reports ({c.known} of its {c.words} words were seen in training; "
                "another language or free text?)")
        lines.append(f"{where}: the report {what}: the model cannot read it, do not trust the mask")
    else:
        lines.append(f"{where}: {len(strange)} report(s) are far from the training reports (few or none of their "
                     f"words were seen in training; another language?): do not trust their masks: "
                     f"{listed(names, strange)}")
    return lines
