"""``lvit train-reporter``: train a report writer (zone flags from the image alone) for report-less inference."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-reporter",
        help="train a report writer: LViT-style reports from the image alone, for images without a report",
        description="Train a small CNN that scores the six lung zones of LViT's report template (upper/middle/lower "
                    "x left/right lung) from the image alone, on the training split's images and reports (which "
                    "must follow the template); the threshold of each zone is chosen on the val split. Its flags "
                    "compose the report (count = zones named). Stored in RUN/reporter/ (so the run carries its "
                    "writer: `lvit predict RUN` without --text uses it) or in --out DIR (use it with --reporter DIR). "
                    "Writes reporter.json (config, thresholds, val scores), weights.safetensors, metrics.csv.",
    )
    p.add_argument("run", nargs="?", metavar="RUN_DIR",
                   help="run folder of the text model the writer serves (the writer goes to RUN_DIR/reporter/)")
    p.add_argument("--data", required=True, help="dataset root (the run's training data)")
    p.add_argument("--out", help="writer folder (default: RUN_DIR/reporter)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3, cosine to 5%%)")
    p.add_argument("--image-size", type=int, default=128, help="input side in pixels, a multiple of 16 (default 128)")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (default 16)")
    p.add_argument("--no-mask-head", action="store_true",
                   help="learn from the reports only; by default the writer also learns the lesion masks (a 1x1 head "
                        "at 1/8 scale: pixel-level supervision during training, unused when writing reports)")
    p.add_argument("--mask-weight", type=float, default=1.0, help="weight of the mask loss (default 1)")
    p.add_argument("--hflip", type=float, default=0.0,
                   help="probability of a horizontal flip in training, left/right flags swapped (default 0)")
    p.add_argument("--no-augment", action="store_true", help="no affine/gamma augmentation")
    p.add_argument("--objective", default="f1", choices=("f1", "accuracy"),
                   help="what each zone's threshold maximises on val (default f1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads while training (default: torch's)")
    p.add_argument("--force", action="store_true", help="write into a non-empty writer folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..artifacts.reporter_folder import RUN_SUBDIR
    from ..core.errors import ConfigError
    from ..models.reporter import ReporterConfig
    from ..train.reporter import ReporterTraining, train_reporter

    if not args.run and not args.out:
        raise ConfigError("give the RUN_DIR the writer belongs to (it goes to RUN_DIR/reporter/) or --out DIR")
    if args.run:
        from ..artifacts.runs import is_model_folder, read_run_config

        run_dir = Path(args.run)
        if not run_dir.is_dir():
            raise ConfigError(f"{run_dir}: not a run folder (give a folder made by lvit train, or only --out DIR)")
        read_run_config(run_dir)  # a one-line error unless it is a run folder
        if is_model_folder(run_dir) and not args.out:
            raise ConfigError(f"{run_dir}: a model folder holds only what prediction needs; lvit never writes into "
                              "one: pass --out DIR for the writer")
    data = Path(args.data)
    if not data.is_dir():
        raise ConfigError(f"--data {data}: not a folder")
    out = Path(args.out) if args.out else Path(args.run) / RUN_SUBDIR
    config = ReporterConfig(image_size=args.image_size, width=args.width, pool_grid=min(4, args.image_size // 16),
                            mask_head=not args.no_mask_head)
    training = ReporterTraining(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                augment=not args.no_augment, hflip=args.hflip, objective=args.objective,
                                threads=args.threads, mask_weight=args.mask_weight)
    train_reporter(data, out, model_config=config, training=training, force=args.force,
                   progress=not args.no_progress)
    return 0
