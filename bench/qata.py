"""LViT, LViT-T and U-Net on real chest X-rays (QaTa-COV19 with LViT's reports) at this machine's scale.

    python bench/qata.py train --data QATA --work W --runs lvit-s0,lvit-t-s0    # trains (or resumes) each run
    python bench/qata.py evaluate --data QATA --work W                          # test split + text probe -> JSON
    python bench/qata.py render                                                  # RESULTS.md section from JSON

``--data`` is a QaTa-COV19 copy in either layout (the annotation-file copy of ShuchangYe-bib/SGSeg, or LViT's
Train_Folder/...). A run is ``<row>-s<seed>``; the rows share the preset ``qata-cpu`` (same budget) and differ
only as listed in ROWS. ``train`` resumes an interrupted run from its last checkpoint and skips finished ones,
so the same command continues a table after a reboot. ``evaluate`` scores each finished run's best-validation
weights on the whole test split (per-image mean and pooled Dice/IoU at 0.5) and, for text models, probes the
reports: true, left/right swapped (scored on the reports the swap changes), another image's report (shuffled,
seeded), and a no-infection report. Raw results: bench/qata_results.json; table: bench/RESULTS.md, section
``qata``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_JSON = REPO / "bench" / "qata_results.json"
RESULTS_MD = REPO / "bench" / "RESULTS.md"
PRESET = "qata-cpu"
# Row name -> (model, extra config overrides). Every row trains with the same preset and budget.
ROWS: dict[str, tuple[str, list[str]]] = {
    "lvit": ("lvit", []),
    "lvit-10tok": ("lvit", ["model.text_tokens=10"]),
    "lvit-t": ("lvit-t", []),
    "unet": ("unet", []),
}


def parse_run(name: str) -> tuple[str, int]:
    row, _, seed = name.rpartition("-s")
    if row not in ROWS or not seed.isdigit():
        raise SystemExit(f"error: run {name!r} is not <row>-s<seed> with row in {', '.join(ROWS)}")
    return row, int(seed)


def finished(run_dir: Path, epochs: int) -> bool:
    metrics = run_dir / "metrics.csv"
    if not (metrics.is_file() and (run_dir / "checkpoints" / "best.safetensors").is_file()):
        return False
    with metrics.open() as f:
        return len(list(csv.DictReader(f))) >= epochs


def train_runs(args) -> int:
    from lvit.train.config import load_config
    from lvit.train.runner import resume_config, train
    from lvit.presets import preset_path

    for name in args.runs.split(","):
        row, seed = parse_run(name)
        model, extra = ROWS[row]
        run_dir = Path(args.work) / "runs" / name
        overrides = [f"model_name={model}", f"trainer.seed={seed}", "trainer.progress=false", *extra, *args.set]
        config = load_config(preset_path(PRESET), overrides)
        if finished(run_dir, config.trainer.max_epochs):
            print(f"{name}: finished, skipped", flush=True)
            continue
        resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
        print(f"{name}: {'resuming' if resume else 'training'} ({config.trainer.max_epochs} epochs)", flush=True)
        if resume:
            config, _ = resume_config(run_dir, ["trainer.progress=false"])
        result = train(config, args.data, run_dir, resume=resume, force=not resume)
        print(f"{name}: best val Dice {result.best_dice:.4f} at epoch {result.best_epoch}, "
              f"{result.seconds / 60:.1f} min", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) runs")
    t.add_argument("--data", type=Path, required=True, help="QaTa-COV19 root (either layout)")
    t.add_argument("--work", type=Path, required=True, help="folder for the run folders (outside the repository)")
    t.add_argument("--runs", required=True, help="comma-separated <row>-s<seed>, rows: " + ", ".join(ROWS))
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    t.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return {"train": train_runs}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
