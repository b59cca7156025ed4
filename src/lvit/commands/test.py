"""``lvit test``: Dice/IoU of a trained run on a dataset split, with masks, overlays and per-image scores."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "test",
        help="evaluate a run on a split: metrics.json, per_image.csv, masks/, overlays/",
        description="Evaluate a trained run (folder or .safetensors weights) on a split of a dataset. Dice/IoU at "
                    "the model's threshold (0.5, the official test code's, unless lvit calibrate chose one; "
                    "--threshold to override): mean over images (what the paper reports) and pooled over the dataset, "
                    "at the "
                    "model's resolution and at the original image size. Both-empty masks score 1.",
    )
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/test-<split>)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--k", type=int, default=4, help="overlays of the k best and k worst images (default 4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--reports", default="true", choices=["true", "generated", "none"],
                   help="true: the dataset's reports (default); generated: reports written from each image by the "
                        "run's report writer (lvit train-reporter; text-guided models); none: no report, the "
                        "model's own no-report path (a model trained with model.report_dropout)")
    p.add_argument("--reporter", metavar="DIR", help="report writer folder for --reports generated (default: "
                                                     "RUN/reporter/)")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability threshold of the masks (default: the model's own, else 0.5)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate.testing import run_test
    from ..inference import Segmenter
    from ..text import default_cache_dir

    segmenter = Segmenter(args.checkpoint, device=args.device, reporter=args.reporter,
                          cache_dir=default_cache_dir(args.data))
    segmenter.warn_about_weights()
    m = run_test(segmenter, args.data, args.split, args.out, force=args.force, k=args.k,
                 batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                 reports=args.reports, reporter=args.reporter, threshold=args.threshold)
    print(format_summary(m))
    return 0


_PATHS = {"report": "from the report path", "no report": "from the no-report path (the model's learned stand-in for "
          "a missing report)", "mixed": "from the report path, and the no-report path where a report is missing",
          "image only": "from the image alone (the model does not read reports)",
          "written": "from the report path, with reports the report writer wrote from the images"}


_THRESHOLD_SOURCES = {"model": " (the model's, chosen on validation data by lvit calibrate)",
                      "default": " (the default: no threshold chosen for these weights)", "given": " (--threshold)"}


def format_summary(m: dict) -> str:
    lines = [f"{m['model_name']} on {m['split']} ({m['n_images']} images):"]
    reports = m.get("reports") or {}
    lines.append(f"  masks {_PATHS.get(reports.get('path'), _PATHS['report'])}, cut at probability "
                 f"{m.get('threshold', 0.5):g}{_THRESHOLD_SOURCES.get(m.get('threshold_source'), '')}")
    if reports.get("source") == "generated":
        agree = reports.get("agreement_with_true_reports")
        k = reports.get("mixed_reports")
        mixed = f"; each mask averages the writer's {k} most likely reports" if k else ""
        lines.append(f"  reports generated from the images by {reports['writer']}"
                     + (f" (same as the dataset's for {agree['exact']:.1%} of images)" if agree else "")
                     + f"; listed in {m['out']}/reports.csv{mixed}")
    model_res = m.get("model_resolution", {})
    if "mean_over_images" in model_res:
        mo, dl = model_res["mean_over_images"], model_res["dataset_level"]
        lines.append(f"  Dice {mo['dice']:.4f}  IoU {mo['iou']:.4f}  "
                     f"(mean over images at {model_res['image_size']} px, "
                     "as the paper reports)")
        lines.append(f"  Dice {dl['dice']:.4f}  IoU {dl['iou']:.4f}  (dataset level, pooled pixels)")
        orig = m["original_resolution"]["mean_over_images"]
        lines.append(f"  Dice {orig['dice']:.4f}  IoU {orig['iou']:.4f}  (mean over images at original size)")
    else:
        lines.append("  no ground-truth masks in this split: predictions only")
    lines.append(f"  metrics: {m['out']}/metrics.json, per_image.csv; masks: {m['masks']}")
    if m.get("weights"):
        lines.append(f"  weights: {m['weights']}")
    if m.get("overlays"):
        lines.append(f"  overlays: {m['out']}/overlays/ (best_*.png, worst_*.png; green = truth, red = prediction)")
    return "\n".join(lines)
