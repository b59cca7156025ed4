"""``lvit predict``: segment one image (or a folder with a report table) with a trained model: a short CLI over
:class:`lvit.inference.Segmenter` and the outputs of :mod:`lvit.artifacts.predictions`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_device_argument, add_model_argument, add_reporter_argument, default_model


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="segment an image (or a folder of images with a report table) with a trained run",
        description="Predict a mask at the input's original size. One image: --image X.png --text '...' --out "
                    "mask.png [--prob prob.png] [--overlay ov.png]. A folder: --images DIR --reports table.xlsx|csv "
                    "--out OUT_DIR [--prob] [--overlay] (writes OUT_DIR/masks/, probs/, overlays/). A text-guided "
                    "model given no report (no --text / --reports, or 'auto') uses the run's report writer (lvit "
                    "train-reporter; RUN/reporter/ or --reporter DIR) to write one from the image, prints it and "
                    "saves it beside the mask (MASK.report.txt; OUT_DIR/reports.csv).")
    add_model_argument(p)
    p.add_argument("--image", help="one image file (PNG, JPEG, TIFF, DICOM, NIfTI)")
    p.add_argument("--text", help="the image's report (text-guided models); without it a model trained with "
                                 "report dropout answers from the image alone (its no-report path), others use the "
                                 "run's report writer; 'auto' always asks the report writer")
    p.add_argument("--images", help="folder of images (batch form)")
    p.add_argument("--reports", help="report table (.xlsx/.csv) for --images; without it, or with 'auto', a "
                                    "text-guided model gets reports written from the images by the run's report writer")
    add_reporter_argument(p, "for images without a report")
    p.add_argument("--image-column", default="Image", help="table column naming the image (or its mask)")
    p.add_argument("--text-column", default="Description", help="table column holding the report")
    p.add_argument("--out", required=True, help="mask file (one image: .png, .tif or .bmp, the format its extension "
                                              "names) or output folder (--images)")
    p.add_argument("--prob", nargs="?", const=True, default=None,
                   help="also save the probability map (one image: its PNG path; --images: a flag)")
    p.add_argument("--overlay", nargs="?", const=True, default=None,
                   help="also save an overlay of the predicted contour (one image: PNG path; --images: a flag)")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability threshold (default: the model's own, chosen on validation data by lvit "
                        "calibrate; else 0.5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", default="torch", choices=("torch", "onnx"),
                   help="inference backend: torch (default) or onnx (ONNX Runtime on CPU; uses RUN/model.onnx "
                        "from `lvit export` when present, else exports on the fly)")
    add_device_argument(p)
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (never the input image)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--images)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError, warn
    from ..inference import Segmenter

    if bool(args.image) == bool(args.images):
        raise ConfigError("give either --image FILE (with --text) or --images DIR (with --reports)")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise ConfigError(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    args.checkpoint = default_model(args.checkpoint, "model: the shipped {name} ({folder}; its README.md says how "
                                                     "it was trained and how well it does)")
    segmenter = Segmenter(args.checkpoint, device=args.device, backend=args.backend, reporter=args.reporter)
    segmenter.warn_about_weights()
    args.threshold_given = args.threshold is not None
    if not args.threshold_given:
        args.threshold = segmenter.threshold
    if not segmenter.uses_text and args.reporter:
        warn(f"--reporter is ignored: the model of {args.checkpoint} ({segmenter.model_name}) does not read reports")
    return (_predict_one if args.image else _predict_folder)(args, segmenter)


def _predict_one(args, segmenter) -> int:
    from ..artifacts import predictions as out_files
    from ..core.errors import ConfigError, DataError, warn
    from ..data import read_image
    from ..inference import requests

    image_path = Path(args.image)
    if image_path.is_dir():
        raise DataError(image_path, "is a folder; predict a folder of images with --images")
    outputs = out_files.check_image_outputs(image_path, args.out, args.prob, args.overlay, args.force)
    image = read_image(image_path)  # a broken image fails here, before the (slower) model load
    text, generate = args.text, segmenter.uses_text and requests.wants_generated(args.text, segmenter)
    if generate:
        requests.writer_folder_or_error(segmenter, '--text "..."')
        out_files.check_report_output(out_files.report_path_for(outputs[0][1]), image_path, outputs, args.force)
    elif segmenter.uses_text and text is not None and not text.strip():
        raise ConfigError(f"{args.checkpoint}: this model reads the report: pass --text \"...\" (or --text auto)")
    if not segmenter.uses_text and text is not None:
        warn(f"--text is ignored: the model of {args.checkpoint} ({segmenter.model_name}) does not read reports")
        text = None
    if generate:
        (prob,), (text,) = segmenter.predict_written([image])  # [H, W] original size
        print(f"{args.image}: no report given: generated from the image by the report writer "
              f"{segmenter.report_writer.folder}: \"{text}\"; {requests.WRITTEN_MASK_NOTE}")
    else:
        if segmenter.uses_text and text is None:
            print(f"{args.image}: {requests.NO_REPORT_NOTE}")
        elif segmenter.uses_text:
            requests.warn_about_reports(segmenter, [text], [image_path.name], "--text")
        prob = segmenter.predict(image, text)  # [H, W] original size
    mask = prob >= args.threshold
    written = out_files.write_image_outputs(outputs, image, prob, mask)
    report_note = out_files.write_or_clear_report(outputs[0][1], image_path, outputs, text if generate else None)
    written += [report_note] if report_note else []
    h, w = mask.shape
    print(f"{args.image}: {w}x{h}, {int(mask.sum())} foreground pixels ({100 * mask.mean():.2f}%) -> "
          + ", ".join(written) + f" (weights: {segmenter.weights}; {_threshold_note(args, segmenter)})")
    return 0


def _predict_folder(args, segmenter) -> int:
    from ..artifacts import predictions as out_files
    from ..core.errors import LvitError
    from ..core.io import output_dir
    from ..inference import requests
    from ..inference.batch import BackgroundCalls, segment_images

    folder = Path(args.images)
    images = requests.image_folder(folder)
    out_files.check_folder_output(Path(args.out), folder)
    generate = segmenter.uses_text and requests.wants_generated(args.reports, segmenter)
    writer_folder = requests.writer_folder_or_error(segmenter, "--reports table.xlsx|csv") if generate else None
    pairs, skipped, failed = requests.images_and_reports(images, folder, args.reports, args.image_column,
                                                         args.text_column, segmenter.uses_text, args.checkpoint,
                                                         segmenter.model_name)
    total = len(pairs) + len(failed)
    with output_dir(Path(args.out), args.force) as out:
        if generate:
            print(f"no report table: the report writer {writer_folder} writes each image's report "
                  f"(saved in {out / out_files.REPORTS}); {requests.WRITTEN_MASK_NOTE}")
        elif segmenter.uses_text and args.reports is None:
            print(f"{folder}: {requests.NO_REPORT_NOTE}")
        elif segmenter.uses_text:
            requests.warn_about_reports(segmenter, [t for _, t in pairs], [p.name for p, _ in pairs],
                                        f"--reports {args.reports}")
        written, generated = 0, []
        with BackgroundCalls() as saving:  # the files are written while the next batch runs
            for path, image, prob, report in segment_images(segmenter, pairs, args.batch_size, generate, failed,
                                                            progress=not args.no_progress):
                saving.submit(out_files.save_folder_prediction, out, path.stem, image, prob,
                              prob >= args.threshold, args.prob, args.overlay)
                written += 1
                generated += [(path.name, report)] if generate else []
        if not written:
            raise LvitError(f"{folder}: none of the {total} image(s) could be predicted (first: {failed[0][1]})")
        listing = out_files.write_folder_lists(out, skipped, failed, generated, writer_folder)
    print(f"predicted {written} of {total + len(skipped)} image(s) in {folder} -> {out}/masks/"
          + (", probs/" if args.prob else "") + (", overlays/" if args.overlay else "")
          + (", reports.csv (generated reports)" if generated else "")
          + f" (weights: {segmenter.weights}; {_threshold_note(args, segmenter)})")
    requests.warn_about_skipped(skipped, folder, args.reports, listing)
    if failed:
        raise LvitError(f"{len(failed)} image(s) could not be predicted ({written} were, into {out}/; every failure "
                        f"is listed in {listing}); first: {failed[0][1]}")
    return 0


def _threshold_note(args, segmenter) -> str:
    from ..artifacts.threshold import describe_threshold

    if args.threshold_given:
        return f"threshold {args.threshold:g} (--threshold)"
    return describe_threshold(segmenter.threshold_record)
