"""``lvit calibrate``: choose a run's mask threshold on its validation images (:mod:`lvit.evaluate.threshold`)."""

from __future__ import annotations

import argparse

DESCRIPTION = ("Score the run's best weights on the validation split at probability thresholds 0.30-0.70 (per-image "
               "Dice at the masks' size) and keep the best in RUN/threshold.json, with the sha256 of the weights it "
               "was chosen for. lvit predict, test, explain and app then cut masks there unless given --threshold; "
               "lvit export copies it into the model folder. Weights trained further no longer match and fall back "
               "to 0.5 with a warning.")


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", description=DESCRIPTION,
                              help="choose a run's mask threshold on validation images (used by predict, test, app)")
    p.add_argument("checkpoint", metavar="RUN_DIR", help="a run folder (lvit train --out); to calibrate a model "
                                                         "folder, calibrate the run it was exported from")
    p.add_argument("--data", required=True, help="dataset root (its val split is used)")
    p.add_argument("--split", default="val", choices=["train", "val"],
                   help="split to choose on (default val; never test)")
    p.add_argument("--reports", default="true", choices=["true", "none"],
                   help="true: each image's report (default); none: the model's no-report path")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dry-run", action="store_true", help="print the sweep, write nothing")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from ..artifacts.runs import is_model_folder, resolve_run, shipped_model
    from ..artifacts.threshold import THRESHOLD_FILE, describe_threshold, write_threshold
    from ..core.errors import ConfigError, DataError
    from ..evaluate.threshold import calibrate
    from ..inference import Segmenter
    from ..text import default_cache_dir

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    source = Path(args.checkpoint)
    if shipped_model(args.checkpoint) is not None and not source.exists():
        raise ConfigError(f"{args.checkpoint}: a shipped model carries the threshold its card states; calibrate a "
                          "run folder of yours")
    if source.is_dir() and is_model_folder(source):
        raise ConfigError(f"{source}: a model folder (its card states its threshold): calibrate the run it was "
                          "exported from, then lvit export it again")
    if not Path(args.data).is_dir():
        raise DataError(args.data, "dataset folder not found (--data)")
    segmenter = Segmenter(args.checkpoint, device=args.device, cache_dir=default_cache_dir(args.data))
    if is_model_folder(segmenter.run_dir):  # also its weights file named directly
        raise ConfigError(f"{segmenter.run_dir}: a model folder (its card states its threshold): calibrate the run "
                          "it was exported from, then lvit export it again")
    used = resolve_run(segmenter.run_dir)[1]
    if Path(segmenter.weights).resolve() != Path(used).resolve():
        raise ConfigError(f"{args.checkpoint}: not the weights lvit test and predict use for {segmenter.run_dir} "
                          f"({used}); the run's threshold is chosen for those: lvit calibrate {segmenter.run_dir}")
    segmenter.warn_about_weights()
    bar = tqdm(desc=f"lvit calibrate ({args.split})", unit="img", disable=args.no_progress)

    def advance(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    record = calibrate(segmenter, args.data, args.split, args.reports, args.batch_size, advance)
    bar.close()
    print(f"{segmenter.run_dir}: per-image Dice on {record['n_images']} {args.split} images "
          f"({args.reports} reports), weights {segmenter.weights}:")
    for t, d in zip(record["thresholds"], record["dice"]):
        print(f"  {t:.2f}  {d:.4f}" + ("  <- chosen" if t == record["threshold"] else ""))
    change = record["dice_at_threshold"] - record["dice_at_0_5"]
    print(f"  {describe_threshold(record)}: {change:+.4f} Dice against 0.5 on these images")
    if args.dry_run:
        print("--dry-run: nothing written")
        return 0
    path = write_threshold(segmenter.run_dir, record)
    print(f"wrote {path} ({THRESHOLD_FILE}: used by lvit predict, test, explain, app and export)")
    return 0
