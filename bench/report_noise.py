"""Does LViT cope better with generated reports when it has seen some in training?

LViT trained on true reports follows a generated report to the wrong zones (bench/RESULTS.md, section
"generated-reports"). This script fine-tunes a trained run with a fraction of the training reports replaced by
the report writer's (the model then learns how far a report can be trusted), and scores it like that section:

    python bench/report_noise.py --data QATA --writer W/reporter --base-run W/runs/lvit-s0 \
        --free-run W/runs/lvit-t-s0 --work W/noise --fraction 0.5 --epochs 3

1. the writer writes a report for every training image;
2. a copy of the dataset (hard links to the images and masks; the annotation-file layout) gets those reports
   for a seeded ``--fraction`` of the training images (val and test keep the true reports);
3. the base run is fine-tuned on it (preset ``qata-cpu``, ``--epochs`` epochs, one cosine cycle from ``--lr``,
   weights from the base run: ``trainer.init_from``);
4. ``bench/generated_reports.py evaluate`` scores it on the original test split under the name
   ``qata-noise<percent>`` (true, generated, no-infection reports, LViT-T), into bench/generated_reports.json.

``--fraction 0`` is the control: the same fine-tuning on the true reports only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchkit import REPO

from lvit.data.layout_annotation import write_annotation


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def mixed_copy(data: Path, out: Path, writer_dir: Path, fraction: float, seed: int) -> dict:
    """The dataset in the annotation-file layout under ``out``, a ``fraction`` of its training reports replaced
    by the writer's. Returns counts."""
    import numpy as np

    from lvit.data import load_split
    from lvit.inference import ReportWriter, write_reports

    annotation, replaced = {}, 0
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        records = load_split(data, split)
        texts = [r.text for r in records]
        if split == "train" and fraction > 0:
            generated, _ = write_reports(ReportWriter(writer_dir), records)
            pick = np.random.default_rng(seed).random(len(records)) < fraction
            texts = [g if p else t for t, g, p in zip(texts, generated, pick)]
            replaced = int(sum(g != t for t, g in zip([r.text for r in records], texts)))
        for r in records:
            link_or_copy(r.image_path, out / "images" / key / "images" / r.image_path.name)
            link_or_copy(r.mask_path, out / "images" / key / "masks" / r.mask_path.name)
        annotation[key] = [{"image_path": r.mask_path.name, "caption": t} for r, t in zip(records, texts)]
    write_annotation(out, annotation)
    return {"train": len(annotation["train"]), "reports_changed": replaced}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="QaTa-COV19 copy (either layout)")
    p.add_argument("--writer", type=Path, required=True, help="report writer folder (lvit train-reporter)")
    p.add_argument("--base-run", type=Path, required=True, help="the trained LViT run to fine-tune")
    p.add_argument("--free-run", type=Path, required=True, help="LViT-T run (the reference of the table)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--fraction", type=float, default=0.5, help="share of training reports replaced (default 0.5)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from lvit.presets import preset_path
    from lvit.train.config import load_config
    from lvit.train.runner import train

    name = f"qata-noise{round(args.fraction * 100)}"
    data_copy = args.work / f"data-{name}"
    run_dir = args.work / f"run-{name}"
    if not (data_copy / "prompts" / "annotation.json").is_file():
        counts = mixed_copy(args.data, data_copy, args.writer, args.fraction, args.seed)
        print(f"{name}: {counts['reports_changed']} of {counts['train']} training reports differ from the true ones",
              flush=True)
    if not (run_dir / "checkpoints" / "best.safetensors").is_file():
        overrides = [f"trainer.max_epochs={args.epochs}", f"optim.t0={args.epochs}", f"optim.lr={args.lr}",
                     f"trainer.init_from={args.base_run}", f"trainer.seed={args.seed}", "trainer.progress=false",
                     f"text.cache_dir={args.work / 'text-cache'}"]
        result = train(load_config(preset_path("qata-cpu"), overrides), data_copy, run_dir, force=True)
        print(f"{name}: best val Dice {result.best_dice:.4f} at epoch {result.best_epoch}", flush=True)
    cmd = [sys.executable, str(REPO / "bench" / "generated_reports.py"), "evaluate", "--name", name,
           "--data", str(args.data), "--text-run", str(run_dir), "--free-run", str(args.free_run),
           "--reporter", str(args.writer), "--cache-dir", str(args.work / "text-cache"),
           "--threads", str(args.threads),
           "--setup", "python bench/report_noise.py " + " ".join(sys.argv[1:] if argv is None else argv)]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
