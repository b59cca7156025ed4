"""``lvit demo``: the whole job on synthetic data - generate, train the synth preset of LViT, test, summarise."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# Sized so the demo finishes in minutes on two CPU cores (docs/TRAINING.md gives measured times).
DEMO_SPLITS = {"n_train": 160, "n_val": 32, "n_test": 48}
# The report variants the demo scores its weights on, to show whether the model reads the report.
DEMO_PROBE = ("true", "swapped", "no_infection")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="generate the synthetic dataset, train LViT (synth preset), test it, print the summary",
        description="End to end on synthetic chest-X-ray-like data in about ten minutes on two CPU cores: writes "
                    "OUT/data (dataset), OUT/run (checkpoints, metrics.csv) and OUT/run/test-test (metrics.json, "
                    "per_image.csv, masks, overlays).",
    )
    p.add_argument("--out", default="lvit-demo", help="output folder (default: ./lvit-demo)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--model", default="lvit", help="a registered network: lvit (default), lvit-t, unet")
    p.add_argument("--config", default="synth", help="preset or YAML (default: synth)")
    p.add_argument("--n-train", type=int, default=DEMO_SPLITS["n_train"])
    p.add_argument("--n-val", type=int, default=DEMO_SPLITS["n_val"])
    p.add_argument("--n-test", type=int, default=DEMO_SPLITS["n_test"])
    from .train import add_override_arguments

    add_override_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.io import atomic_write_json, prepare_output_dir
    from ..data import generate_synthetic
    from ..evaluate.testing import run_test
    from ..evaluate.text_probe import format_probe, probe_reports
    from ..models import reads_text
    from ..presets import resolve_config
    from ..train.config import load_config
    from ..train.runner import train
    from .test import format_summary
    from .train import collect_overrides

    started = time.perf_counter()
    config = load_config(resolve_config(args.config), collect_overrides(args))
    out = prepare_output_dir(args.out, force=args.force, what="demo folder")
    progress = config.trainer.progress
    print(f"[1/3] generating the synthetic dataset in {out / 'data'}")
    data = generate_synthetic(out / "data", n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                              size=config.model.image_size, seed=args.seed or 0, force=True, progress=progress)
    print(f"[2/3] training {config.model_name} ({config.trainer.max_epochs} epochs, {config.model.image_size} px) "
          f"into {out / 'run'}")
    result = train(config, data, out / "run", force=True)
    print(f"[3/3] testing the best checkpoint (epoch {result.best_epoch}, val Dice {result.best_dice:.4f})")
    metrics = run_test(out / "run", data, "test", out / "run" / "test-test", force=True, progress=progress)
    print(format_summary(metrics))
    if reads_text(metrics["model_name"], config.model):
        probe = probe_reports(out / "run", data, "test", variants=DEMO_PROBE)
        metrics["text_probe"] = probe
        atomic_write_json(Path(metrics["out"]) / "metrics.json", {k: v for k, v in metrics.items() if k != "out"})
        print(format_probe(probe))
        true, swapped = probe["variants"]["true"]["dice"], probe["variants"]["swapped"]["dice"]
        print(f"  the model reads the report: Dice {true:.4f} with the true reports, {swapped:.4f} with left and "
              f"right swapped (saved under text_probe in metrics.json)" if true > swapped else
              f"  the swapped reports score as well as the true ones ({swapped:.4f} vs {true:.4f}): this run has "
              "not learned to read where the report puts the lesions")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; train curve: {out / 'run' / 'metrics.csv'}")
    return 0
