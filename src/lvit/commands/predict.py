"""``lvit predict``: segment one image (or a folder with a report table) with a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="segment an image (or a folder of images with a report table) with a trained run",
        description="Predict a mask at the input's original size. One image: --image X.png --text '...' --out "
                    "mask.png [--prob prob.png] [--overlay ov.png]. A folder: --images DIR --reports table.xlsx|csv "
                    "--out OUT_DIR [--prob] [--overlay] (writes OUT_DIR/masks/, probs/, overlays/). A text-guided "
                    "model given no report (no --text / --reports, or 'auto') uses the run's report writer (lvit "
                    "train-reporter; RUN/reporter/ or --reporter DIR) to write one from the image, prints it and "
                    "saves it beside the mask (MASK.report.txt; OUT_DIR/reports.csv).",
    )
    p.add_argument("checkpoint", metavar="MODEL", nargs="?", default=None,
                   help="a run folder, its .safetensors weights, a model folder or a shipped model's name (default: "
                        "the shipped QaTa-COV19 chest X-ray model, qata-lvit)")
    p.add_argument("--image", help="one image file (PNG, JPEG, TIFF, DICOM, NIfTI)")
    p.add_argument("--text", help="the image's report (text-guided models); without it a model trained with "
                                 "report dropout answers from the image alone (its no-report path), others use the "
                                 "run's report writer; 'auto' always asks the report writer")
    p.add_argument("--images", help="folder of images (batch form)")
    p.add_argument("--reports", help="report table (.xlsx/.csv) for --images; without it, or with 'auto', "
                                    "a text-guided "
                                    "model gets reports written from the images by the run's report writer")
    p.add_argument("--reporter", metavar="DIR",
                   help="report writer folder (lvit train-reporter --out DIR) for images without a report (default: "
                        "RUN/reporter/)")
    p.add_argument("--image-column", default="Image", help="table column naming the image (or its mask)")
    p.add_argument("--text-column", default="Description", help="table column holding the report")
    p.add_argument("--out", required=True, help="mask file (one image: .png, .tif or .bmp, the format its extension "
                                              "names) or output folder (--images)")
    p.add_argument("--prob", nargs="?", const=True, default=None,
                   help="also save the probability map (one image: its PNG path; --images: a flag)")
    p.add_argument("--overlay", nargs="?", const=True, default=None,
                   help="also save an overlay of the predicted contour (one image: PNG path; --images: a flag)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", default="torch", choices=("torch", "onnx"),
                   help="inference backend: torch (default) or onnx (ONNX Runtime on CPU; uses RUN/model.onnx "
                        "from `lvit export` when present, else exports on the fly)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (never the input image)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--images)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError
    from ..evaluate.predict import resolve_device

    if bool(args.image) == bool(args.images):
        raise ConfigError("give either --image FILE (with --text) or --images DIR (with --reports)")
    if args.reporter is not None and not Path(args.reporter).is_dir():
        raise ConfigError(f"--reporter {args.reporter}: not a folder (give a folder written by lvit train-reporter)")
    if not 0.0 < args.threshold < 1.0:
        raise ConfigError(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)  # before anything slow
    if args.checkpoint is None:
        from ..artifacts.runs import DEFAULT_MODEL, shipped_model

        if shipped_model(DEFAULT_MODEL) is None:
            raise ConfigError(f"no model given and this lvit ships no {DEFAULT_MODEL}: pass a run or model folder")
        args.checkpoint = DEFAULT_MODEL
        print(f"model: the shipped {DEFAULT_MODEL} ({shipped_model(DEFAULT_MODEL)}; its README.md says how it was "
              "trained and how well it does)")
    if args.backend == "onnx" and device.type != "cpu":
        raise ConfigError("--backend onnx runs on CPU (ONNX Runtime's CPU provider): use --device cpu")
    if args.image:
        return _predict_one(args)
    return _predict_folder(args)


def _predictor(args):
    from ..evaluate.predict import Predictor

    return Predictor(args.checkpoint, device=args.device, backend=args.backend)


def _read_run(args):
    """(run folder, weights, run config) of CHECKPOINT_OR_RUN, without loading the model; warns when a run
    folder has no best weights (the last ones are used)."""
    from ..core.errors import warn
    from ..evaluate.predict import read_run, weights_warning

    run_dir, weights, run_config = read_run(args.checkpoint)
    note = weights_warning(args.checkpoint, weights)
    if note:
        warn(note)
    return run_dir, weights, run_config


AUTO = "auto"


def _wants_generated(value: str | None, run_config: dict | None = None) -> bool:
    """'auto', or no report for a model without a no-report path: the report writer writes it."""
    from ..evaluate.predict import model_has_no_report_path

    if value is None:
        return run_config is None or not model_has_no_report_path(run_config)
    return value.strip().lower() == AUTO


NO_REPORT_NOTE = "no report given: the mask comes from the model's no-report path (learned with report dropout)"


def _report_writer_folder(args, run_dir: Path, flag: str) -> Path:
    """The report writer a text-guided model uses for images without a report: --reporter DIR, else the run's
    own (RUN/reporter/). A one-line error says how to get one when there is none."""
    from ..artifacts.reporter_folder import find_reporter, read_reporter_meta
    from ..core.errors import ConfigError

    where = Path(args.reporter) if args.reporter else Path(run_dir)
    folder = find_reporter(where)
    if folder is None:
        if args.reporter:
            raise ConfigError(f"--reporter {args.reporter}: no report writer in this folder (reporter.json missing)")
        raise ConfigError(f"{args.checkpoint}: this model reads the report: pass {flag}, or give it a report "
                          f"writer to write one from the image (lvit train-reporter {run_dir} --data ROOT, or "
                          "--reporter DIR)")
    read_reporter_meta(folder)  # damaged -> one line now, before the slow work
    return folder


def report_path_for(mask_path: Path) -> Path:
    """Where a generated report is saved beside the mask: ``mask.png`` -> ``mask.report.txt``."""
    return mask_path.with_name(mask_path.stem + ".report.txt")


def _check_outputs(args, image_path: Path) -> list[tuple[str, Path, str]]:
    """--out/--prob/--overlay of one image: each a distinct file, none the input, a format its extension names
    (masks and probabilities lossless), not a folder, new unless --force, in a writable place.
    -> [(flag, path, format)]"""
    from ..core.errors import ConfigError, OutputExistsError
    from ..core.io import check_writable, image_format, refuse_clobber, same_file

    for flag, value in (("--prob", args.prob), ("--overlay", args.overlay)):
        if value is True:
            raise ConfigError(f"{flag} needs a file path when predicting one image (e.g. {flag} out.png)")
    wanted = [(flag, Path(value), lossless) for flag, value, lossless in
              (("--out", args.out, True), ("--prob", args.prob, True), ("--overlay", args.overlay, False)) if value]
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
        refuse_clobber(path, args.force)
        check_writable(path)
        outputs.append((flag, path, fmt))
    return outputs


def _warn_about_reports(checker, checks, names: list[str], where: str) -> None:
    """One warning line per kind of doubt about the reports (truncated, no known words, nothing to check)."""
    from ..core.errors import warn

    def listed(idx: list[int]) -> str:
        shown = ", ".join(names[i] for i in idx[:5])
        return shown + (f" and {len(idx) - 5} more" if len(idx) > 5 else "")

    single = len(checks) == 1
    cut = [i for i, c in enumerate(checks) if c.truncated]
    if cut:
        c = max((checks[i] for i in cut), key=lambda c: c.tokens)
        if single:
            warn(f"{where}: report truncated: the model keeps {c.kept} of its {c.tokens:,} tokens (word pieces); "
                 "the rest is ignored")
        else:
            warn(f"{where}: {len(cut)} report(s) truncated to the model's {c.kept} tokens (word pieces), the longest "
                 f"has {c.tokens:,}: {listed(cut)}")
    if checker.known_words is None:
        warn(checker.no_record_note())
        return
    strange = [i for i, c in enumerate(checks) if c.unfamiliar]
    if not strange:
        return
    if single:
        c = checks[0]
        what = ("has no words (only symbols or emoji)" if c.words == 0 else
                f"is far from the training reports ({c.known} of its {c.words} words were seen in training; "
                "another language or free text?)")
        warn(f"{where}: the report {what}: the model cannot read it, do not trust the mask")
    else:
        warn(f"{where}: {len(strange)} report(s) are far from the training reports (few or none of their words "
             f"were seen in training; another language?): do not trust their masks: {listed(strange)}")


def _predict_one(args) -> int:
    from ..core.errors import ConfigError, DataError, warn
    from ..core.io import save_image
    from ..data import read_image
    from ..evaluate.overlays import mask_png, overlay, probability_png
    from ..evaluate.predict import model_reads_text

    image_path = Path(args.image)
    if image_path.is_dir():
        raise DataError(image_path, "is a folder; predict a folder of images with --images")
    outputs = _check_outputs(args, image_path)
    run_dir, weights, run_config = _read_run(args)  # the run's config only: cheap
    image = read_image(image_path)  # a broken image fails here, before the (slower) model load
    reads_text = model_reads_text(run_config)
    text = args.text
    writer_folder = report_file = None
    if reads_text and _wants_generated(text, run_config):
        from ..core.io import check_writable, refuse_clobber, same_file

        writer_folder = _report_writer_folder(args, run_dir, '--text "..."')
        report_file = report_path_for(outputs[0][1])
        if any(same_file(report_file, p) for p in [image_path, *(p for _, p, _ in outputs)]):
            raise ConfigError(f"{report_file}: the generated report would overwrite another file; rename --out")
        refuse_clobber(report_file, args.force)
        check_writable(report_file)
    elif reads_text and text is not None and not text.strip():
        raise ConfigError(f"{args.checkpoint}: this model reads the report: pass --text \"...\" (or --text auto)")
    if not reads_text and text is not None:
        warn(f"--text is ignored: the model of {args.checkpoint} ({run_config.get('model_name')}) does not read "
             "reports")
        text = None
    if not reads_text and args.reporter:
        warn(f"--reporter is ignored: the model of {args.checkpoint} ({run_config.get('model_name')}) does not read "
             "reports")
    if writer_folder is not None:
        from ..evaluate.reporter import ReportWriter

        text = ReportWriter(writer_folder, device=args.device).report(image)
        print(f"{args.image}: no report given: generated from the image by the report writer {writer_folder}: "
              f"\"{text}\"")
    elif reads_text and text is None:
        print(f"{args.image}: {NO_REPORT_NOTE}")
    elif reads_text:
        from ..text.vocabulary import ReportChecker

        checker = ReportChecker(run_config, run_dir)
        _warn_about_reports(checker, [checker.check(text)], [image_path.name], "--text")
    predictor = _predictor(args)
    prob = predictor.predict(image, text)  # [H, W] original size
    mask = prob >= args.threshold
    render = {"--out": lambda: mask_png(mask), "--prob": lambda: probability_png(prob),
              "--overlay": lambda: overlay(image, mask)}
    for flag, path, fmt in outputs:
        save_image(path, render[flag](), fmt)
    written = [str(p) for _, p, _ in outputs]
    if report_file is not None:
        from ..core.io import atomic_write_text

        atomic_write_text(report_file, text + "\n")
        written.append(f"{report_file} (generated report)")
    else:  # a report generated for an earlier mask of this name no longer describes it
        stale = report_path_for(outputs[0][1])
        if stale.is_file() and not any(stale == p for _, p, _ in outputs) and stale != image_path:
            stale.unlink()
            written.append(f"{stale} removed (a report generated for the mask this one replaces)")
    h, w = mask.shape
    print(f"{args.image}: {w}x{h}, {int(mask.sum())} foreground pixels ({100 * mask.mean():.2f}%) -> "
          + ", ".join(written) + f" (weights: {weights})")
    return 0


def _pairs(args, folder: Path, images: dict[str, Path], reads_text: bool, model_name: str):
    """What to predict in --images: ([(image path, report)], skipped [(name, why)], failed [(name, why)]).

    Images without a row in --reports are skipped; rows that name no image of the folder, or (text models)
    hold an empty report, fail. A table that cannot be read at all stops everything (one line).
    """
    from ..core.errors import warn
    from ..data.layout_official import match_row, read_table

    if args.reports is None or _wants_generated(args.reports):
        # No table (or 'auto'): every image; a text-guided model gets reports written from the images, or answers
        # from its no-report path.
        if args.reports is not None and not reads_text:
            warn(f"--reports {args.reports} is ignored: the model of {args.checkpoint} ({model_name}) does not read "
                 "reports")
        return [(path, None) for path in images.values()], [], []
    table = Path(args.reports)
    if not reads_text:
        warn(f"--reports {table}: the model of {args.checkpoint} ({model_name}) does not read reports; the table "
             "only selects the images to predict")
    pairs, failed, used = [], [], set()
    for row in read_table(table, args.image_column, args.text_column):
        name, _ = match_row(row.key, images, {})
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


def _write_skipped(path: Path, skipped, failed) -> None:
    import csv
    import io

    from ..core.io import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "status", "reason"])
    for status, items in (("skipped", skipped), ("failed", failed)):
        for name, why in items:
            writer.writerow([name, status, why])
    atomic_write_text(path, buf.getvalue())


def _write_generated(path: Path, rows: list[tuple[str, str]], writer_folder: Path) -> None:
    """OUT/reports.csv: image, report (written by the report writer), writer folder."""
    import csv
    import io

    from ..core.io import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "report", "source"])
    for name, text in rows:
        writer.writerow([name, text, f"generated by {writer_folder}"])
    atomic_write_text(path, buf.getvalue())


def _predict_folder(args) -> int:
    from tqdm import tqdm

    from ..core.errors import ConfigError, DataError, LvitError, warn
    from ..core.io import output_dir, same_file, save_png
    from ..data import read_image
    from ..data.records import index_folder
    from ..evaluate.overlays import mask_png, overlay, probability_png
    from ..evaluate.predict import model_reads_text

    folder = Path(args.images)
    if not folder.is_dir():
        raise DataError(folder, "image folder not found" if not folder.exists() else "not a folder (--images)")
    images = index_folder(folder)
    if not images:
        raise DataError(folder, "no image files in this folder")
    out_arg = Path(args.out)
    for sub in ("", "masks", "probs", "overlays"):
        if same_file(out_arg / sub, folder):
            raise ConfigError(f"--out {out_arg}: {'it' if not sub else sub + '/ in it'} is the --images folder: the "
                              "predictions would mix with (or overwrite) the input images; choose another folder")
    run_dir, weights, run_config = _read_run(args)
    reads_text = model_reads_text(run_config)
    generate = reads_text and _wants_generated(args.reports, run_config)
    writer_folder = _report_writer_folder(args, run_dir, "--reports table.xlsx|csv") if generate else None
    if not reads_text and args.reporter:
        warn(f"--reporter is ignored: the model of {args.checkpoint} ({run_config.get('model_name')}) does not read "
             "reports")
    pairs, skipped, failed = _pairs(args, folder, images, reads_text, run_config.get("model_name"))
    total = len(pairs) + len(failed)
    if not pairs:
        reason = (failed or skipped or [("", "nothing to predict")])[0][1]
        raise LvitError(f"{folder}: no image to predict ({len(skipped)} without a report row, {len(failed)} failed; "
                        f"first: {reason})")
    with output_dir(out_arg, args.force) as out:
        writer, generated = None, []
        if generate:
            from ..evaluate.reporter import ReportWriter

            writer = ReportWriter(writer_folder, device=args.device)
            print(f"no report table: the report writer {writer_folder} writes each image's report "
                  f"(saved in {out / 'reports.csv'})")
        elif reads_text and args.reports is None:
            print(f"{folder}: {NO_REPORT_NOTE}")
        elif reads_text:
            from ..text.vocabulary import ReportChecker

            checker = ReportChecker(run_config, run_dir)
            _warn_about_reports(checker, checker.check_many([t for _, t in pairs]), [p.name for p, _ in pairs],
                                f"--reports {args.reports}")
        predictor = _predictor(args)
        written = 0
        with tqdm(total=len(pairs), desc="lvit predict", unit="img", disable=args.no_progress) as bar:
            for start in range(0, len(pairs), args.batch_size):
                chunk = []
                for path, text in pairs[start:start + args.batch_size]:
                    try:
                        chunk.append((path, text, read_image(path)))
                    except DataError as exc:  # a broken image: note it, go on with the others
                        failed.append((path.name, str(exc)))
                        bar.update(1)
                if not chunk:
                    continue
                texts = [text for _, text, _ in chunk] if predictor.uses_text else None
                if writer is not None:
                    texts = writer.reports([image for _, _, image in chunk])
                    generated += [(path.name, text) for (path, _, _), text in zip(chunk, texts)]
                probs = predictor.predict_many([image for _, _, image in chunk], texts)
                for (path, _, image), prob in zip(chunk, probs):
                    mask = prob >= args.threshold
                    save_png(out / "masks" / f"{path.stem}.png", mask_png(mask))
                    if args.prob:
                        save_png(out / "probs" / f"{path.stem}.png", probability_png(prob))
                    if args.overlay:
                        save_png(out / "overlays" / f"{path.stem}.png", overlay(image, mask))
                    written += 1
                    bar.update(1)
        if not written:
            raise LvitError(f"{folder}: none of the {total} image(s) could be predicted (first: {failed[0][1]})")
        listing = out / "skipped.csv"
        if skipped or failed:
            _write_skipped(listing, skipped, failed)
        else:
            listing.unlink(missing_ok=True)  # an earlier run's list describes other masks
        if generated:
            _write_generated(out / "reports.csv", generated, writer_folder)
        else:
            (out / "reports.csv").unlink(missing_ok=True)
    print(f"predicted {written} of {total + len(skipped)} image(s) in {folder} -> {out}/masks/"
          + (", probs/" if args.prob else "") + (", overlays/" if args.overlay else "")
          + (", reports.csv (generated reports)" if generated else "") + f" (weights: {weights})")
    if skipped:
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        names = ", ".join(name for name, _ in skipped[:5]) + more
        warn(f"{len(skipped)} image(s) in {folder} have no row in {args.reports} and were not predicted: {names} "
             f"(listed in {listing})")
    if failed:
        raise LvitError(f"{len(failed)} image(s) could not be predicted ({written} were, into {out}/; every failure "
                        f"is listed in {listing}); first: {failed[0][1]}")
    return 0
