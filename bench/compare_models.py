"""LViT vs LViT-T vs U-Net on the synthetic dataset, same budget (preset, epochs, seed, data).

    python bench/compare_models.py [--work /tmp/lvit-compare] [--epochs N] [--models lvit lvit-t unet]

Generates the synthetic dataset once (the demo's sizes), trains each model with the ``synth`` preset, tests
the best checkpoint on the test split and writes a table into bench/RESULTS.md between the markers
``<!-- compare_models:start -->`` and ``<!-- compare_models:end -->`` (the rest of the file is kept).
The synthetic reports say which opacities are lesions and which are distractors, so LViT (text) should beat
LViT-T (no text) clearly; U-Net is the text-free CNN baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"


def main(argv: list[str] | None = None) -> int:
    from lvit.commands.demo import DEMO_SPLITS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/lvit-compare", help="scratch folder (dataset + runs)")
    p.add_argument("--config", default="synth", help="preset name or YAML file")
    p.add_argument("--models", nargs="+", default=["lvit", "lvit-t", "unet"])
    p.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs for every model")
    p.add_argument("--n-train", type=int, default=DEMO_SPLITS["n_train"])
    p.add_argument("--n-val", type=int, default=DEMO_SPLITS["n_val"])
    p.add_argument("--n-test", type=int, default=DEMO_SPLITS["n_test"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = p.parse_args(argv)

    import torch

    from lvit.data import generate_synthetic
    from lvit.evaluate.testing import run_test
    from lvit.models import build_model, count_parameters
    from lvit.presets import resolve_config
    from lvit.train.config import load_config
    from lvit.train.runner import train

    overrides = list(args.overrides) + ["trainer.progress=false"]
    if args.epochs:
        overrides.append(f"trainer.max_epochs={args.epochs}")
    base = load_config(resolve_config(args.config), overrides)
    work = Path(args.work)
    data = generate_synthetic(work / "data", n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                              size=base.model.image_size, seed=0, force=True, progress=False)
    rows = []
    for name in args.models:
        config = load_config(resolve_config(args.config), overrides + [f"model_name={name}"])
        print(f"== {name}: training {config.trainer.max_epochs} epochs", flush=True)
        result = train(config, data, work / f"run-{name}", force=True)
        metrics = run_test(work / f"run-{name}", data, "test", work / f"run-{name}" / "test", force=True,
                           progress=False)
        params = count_parameters(build_model(name, config.model))
        mo = metrics["model_resolution"]["mean_over_images"]
        dl = metrics["model_resolution"]["dataset_level"]
        rows.append({"model": name, "dice": mo["dice"], "iou": mo["iou"], "pooled_dice": dl["dice"],
                     "params": params, "seconds": result.seconds, "epochs": result.epochs,
                     "best_epoch": result.best_epoch, "val_dice": result.best_dice})
        print(f"   test Dice {mo['dice']:.4f} IoU {mo['iou']:.4f}  ({result.seconds:.0f} s)", flush=True)

    machine = (f"{platform.machine()} {platform.processor() or ''}".strip()
               + f", {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
               + f"Python {platform.python_version()}, load average at start {os.getloadavg()[0]:.1f}")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    section = render(rows, base, machine, command, args)
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"wrote the table into {RESULTS}")
    return 0


def render(rows, config, machine, command, args) -> str:
    lines = [
        "## LViT vs LViT-T vs U-Net on the synthetic dataset",
        "",
        f"Same budget for every model: preset `{Path(args.config).name}` ({config.model.image_size} px, "
        f"base_channels {config.model.base_channels}, text encoder `{config.text.encoder}`, "
        f"{config.model.text_tokens} tokens), {config.trainer.max_epochs} epochs max, seed {config.trainer.seed}, "
        f"synthetic data seed 0 ({args.n_train} train / {args.n_val} val / {args.n_test} test). Test figures: "
        "best-validation checkpoint, threshold 0.5, mean over images (the paper's figure) and pooled.",
        "",
        "| model | test Dice | test IoU | pooled Dice | params | train time | epochs (best) | best val Dice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dice']:.4f} | {r['iou']:.4f} | {r['pooled_dice']:.4f} | "
                     f"{r['params'] / 1e6:.2f}M | {r['seconds']:.0f} s | {r['epochs']} ({r['best_epoch']}) | "
                     f"{r['val_dice']:.4f} |")
    lines += ["", f"Machine: {machine}. Recorded {time.strftime('%Y-%m-%d %H:%M')}.", "",
              f"Command: `{command}`"]
    return "\n".join(lines)


def write_section(section: str) -> None:
    from lvit.io import write_marked_section

    write_marked_section(RESULTS, "compare_models", section)


if __name__ == "__main__":
    sys.exit(main())
