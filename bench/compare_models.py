"""LViT vs LViT-T vs U-Net on the synthetic dataset, same budget (preset, epochs, seed, data), plus the text probe.

    python bench/compare_models.py [--work /tmp/lvit-compare] [--seeds 666,0] [--models lvit,lvit-t,unet]
    python bench/compare_models.py --render-only

Generates the demo's synthetic dataset once (data seed 0), trains each model with the ``synth`` preset for each
trainer seed (the data stay the same), tests the best checkpoint on the test split (Dice/IoU at 0.5, mean over
images and pooled) and scores the LViT runs under changed reports (lvit.evaluate.text_probe: true, left/right
swapped, no-infection). Raw results: bench/compare_models.json (one entry per model and seed, merged with what is
there); bench/RESULTS.md section ``compare_models`` is rendered from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from benchkit import REPO, RESULTS_MD

RESULTS_JSON = REPO / "bench" / "compare_models.json"
LABELS = {"lvit": "LViT (text)", "lvit-t": "LViT-T (no text)", "unet": "U-Net"}


def main(argv: list[str] | None = None) -> int:
    from lvit.commands.demo import DEMO_SPLITS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/lvit-compare"), help="scratch folder (dataset + runs)")
    p.add_argument("--config", default="synth", help="preset name or YAML file")
    p.add_argument("--models", default="lvit,lvit-t,unet")
    p.add_argument("--seeds", default="666", help="trainer seeds (666 = the preset's)")
    p.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs for every model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--render-only", action="store_true", help="train nothing: render the table from the file")
    p.add_argument("--results", type=Path, default=RESULTS_JSON)
    p.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = p.parse_args(argv)

    from lvit.core.io import atomic_write_text, read_results_file

    results = read_results_file(args.results)
    if not args.render_only:
        import torch

        from lvit.artifacts.runs import load_run
        from lvit.benchmark import cpu_name
        from lvit.data import generate_synthetic
        from lvit.evaluate.testing import run_test
        from lvit.evaluate.text_probe import probe_reports
        from lvit.models import count_parameters, reads_text
        from lvit.presets import resolve_config
        from lvit.train.config import load_config
        from lvit.train.runner import train

        overrides = list(args.overrides) + ["trainer.progress=false"]
        if args.epochs:
            overrides.append(f"trainer.max_epochs={args.epochs}")
        base = load_config(resolve_config(args.config), overrides)
        data = generate_synthetic(args.work / "data", size=base.model.image_size, seed=0, force=True, progress=False,
                                  **DEMO_SPLITS)
        command = "python " + " ".join(
            shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
        for seed in [int(s) for s in args.seeds.split(",")]:
            for name in args.models.split(","):
                config = load_config(resolve_config(args.config), overrides + [f"model_name={name}",
                                                                             f"trainer.seed={seed}"])
                run = args.work / f"run-{name}-s{seed}"
                result = finished_run(run, config.trainer.max_epochs)
                reused = result is not None
                if result is None:
                    print(f"== {name}, seed {seed}: training {config.trainer.max_epochs} epochs", flush=True)
                    result = train(config, data, run, force=True)
                else:
                    print(f"== {name}, seed {seed}: finished run in {run}, reused", flush=True)
                metrics = run_test(run, data, "test", run / "test", force=True, progress=False)
                mo = metrics["model_resolution"]["mean_over_images"]
                dl = metrics["model_resolution"]["dataset_level"]
                entry = {"model": name, "seed": seed, "dice": mo["dice"], "iou": mo["iou"], "pooled_dice": dl["dice"],
                         "params": count_parameters(load_run(run).model),  # with the encoder's text width
                         "train_seconds": result.seconds, "epochs": result.epochs, "best_epoch": result.best_epoch,
                         "best_val_dice": result.best_dice, "preset": str(args.config),
                         "machine": f"CPU {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
                         "load_at_start": round(os.getloadavg()[0], 1), "command": command,
                         "recorded": time.strftime("%Y-%m-%d %H:%M"), "reused": reused}
                if reads_text(name, config.model):
                    probe = probe_reports(run, data, "test", variants=("true", "swapped", "no_infection"))
                    entry["probe"] = {v: r["dice"] for v, r in probe["variants"].items()}
                    entry["probe_swapped_changed"] = probe["variants"]["swapped"]["changed"]
                results[f"{name}/s{seed}"] = entry
                atomic_write_text(args.results, json.dumps(results, indent=1, sort_keys=True) + "\n")
                print(f"   test Dice {mo['dice']:.4f} IoU {mo['iou']:.4f} ({result.seconds:.0f} s)", flush=True)
    section = render(results)
    print(section)
    if section:
        from lvit.core.io import write_marked_section

        write_marked_section(args.results_md, "compare_models", section)
    return 0


def finished_run(run: Path, epochs: int):
    """The training facts of a run folder that already holds all ``epochs`` (a rerun after an interruption
    reuses it; the data are regenerated byte-identical), else None."""
    import csv
    from types import SimpleNamespace

    metrics = run / "metrics.csv"
    if not (metrics.is_file() and (run / "checkpoints" / "best.safetensors").is_file()):
        return None
    with metrics.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) < epochs:
        return None
    best = max(rows, key=lambda r: float(r["val_dice"]))
    return SimpleNamespace(seconds=sum(float(r["seconds"]) for r in rows), epochs=len(rows),
                           best_epoch=int(best["epoch"]), best_dice=float(best["val_dice"]))


def render(results: dict) -> str:
    if not results:
        return ""
    rows = sorted(results.values(), key=lambda r: (r["seed"] != 666, r["seed"], list(LABELS).index(r["model"])))
    lines = [
        "## LViT vs LViT-T vs U-Net on the synthetic dataset (the demo's data and preset)",
        "",
        "Same data (`lvit synth`, seed 0: 160 train / 32 val / 48 test, 128 px), same preset (`synth`: base width 16, "
        "MiniLM text with 24 tokens, Adam 1e-3, cosine warm restarts T_0 = 10, batch 8, augmentation on), 40 epochs "
        "each; test figures from the best-validation weights, Dice/IoU at 0.5, mean over images (the paper's figure; "
        "both-empty = 1) and pooled over all test pixels. Text probe: the same LViT weights with left and right "
        "swapped in every report, and with \"No pulmonary infection.\" for every image.",
        "",
        "| trainer seed | model | test Dice | test IoU | pooled Dice | best val Dice (epoch) | Dice, swapped | "
        "Dice, no-infection | params | train time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        probe = r.get("probe") or {}
        sw = f"{probe['swapped']:.3f}" if "swapped" in probe else "-"
        ni = f"{probe['no_infection']:.3f}" if "no_infection" in probe else "-"
        lines.append(f"| {r['seed']} | {LABELS.get(r['model'], r['model'])} | {r['dice']:.3f} | {r['iou']:.3f} | "
                     f"{r['pooled_dice']:.3f} | {r['best_val_dice']:.3f} ({r['best_epoch']}) | {sw} | {ni} | "
                     f"{r['params'] / 1e6:.2f}M | {r['train_seconds']:.0f} s "
                     + ("(an earlier invocation) |" if r.get("reused") else f"(load {r['load_at_start']}) |"))
    machines = sorted({r["machine"] for r in rows})
    commands = sorted({r["command"] for r in rows})
    lines += ["", f"Machine: {'; '.join(machines)}. Raw results: `bench/compare_models.json`. Command(s): "
              + "; ".join(f"`{c}`" for c in commands) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
