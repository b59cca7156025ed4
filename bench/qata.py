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


def run_facts(run_dir: Path) -> dict:
    """Training facts of a run folder: epochs, best epoch and val Dice, minutes of epochs (metrics.csv)."""
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: float(r["val_dice"]))
    return {"epochs": len(rows), "best_epoch": int(best["epoch"]), "best_val_dice": round(float(best["val_dice"]), 4),
            "train_minutes": round(sum(float(r["seconds"]) for r in rows) / 60, 1)}


def evaluate_runs(args) -> int:
    import time

    import yaml

    from lvit.evaluate.testing import run_test
    from lvit.evaluate.text_probe import probe_reports
    from lvit.io import read_results_file
    from lvit.models import build_model, count_parameters
    from lvit.train.config import TrainConfig

    results = read_results_file(args.results)
    runs = sorted(p.name for p in (Path(args.work) / "runs").iterdir() if p.is_dir())
    wanted = set(args.runs.split(",")) if args.runs else None
    for name in runs:
        if wanted is not None and name not in wanted:
            continue
        row, seed = parse_run(name)
        run_dir = Path(args.work) / "runs" / name
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        epochs = int(saved["trainer"]["max_epochs"])
        if not finished(run_dir, epochs):
            print(f"{name}: not finished, skipped", flush=True)
            continue
        if name in results and not args.again:
            print(f"{name}: already evaluated", flush=True)
            continue
        started = time.perf_counter()
        metrics = run_test(run_dir, args.data, "test", run_dir / "test-test", force=True, progress=False,
                           batch_size=32)
        model_res, orig_res = metrics["model_resolution"], metrics["original_resolution"]
        config = TrainConfig.from_dict({k: v for k, v in saved.items()
                                        if k not in ("lvit_version", "text_encoder", "data_info")})
        entry = {
            "row": row, "seed": seed, "model": saved["model_name"], "text_tokens": saved["model"]["text_tokens"],
            "image_size": saved["model"]["image_size"], "base_channels": saved["model"]["base_channels"],
            "params": count_parameters(build_model(config.model_name, config.model)),
            **run_facts(run_dir),
            "n_test": metrics["n_scored"],
            "dice": model_res["mean_over_images"]["dice"], "iou": model_res["mean_over_images"]["iou"],
            "pooled_dice": model_res["dataset_level"]["dice"], "pooled_iou": model_res["dataset_level"]["iou"],
            "dice_original": orig_res["mean_over_images"]["dice"], "iou_original": orig_res["mean_over_images"]["iou"],
            "pooled_dice_original": orig_res["dataset_level"]["dice"],
            "machine": machine(),
        }
        if saved["model_name"] == "lvit":
            entry["probe"] = probe_reports(run_dir, args.data, "test", batch_size=32)
        entry["evaluate_minutes"] = round((time.perf_counter() - started) / 60, 1)
        results = merge_result(args.results, name, entry)
        print(f"{name}: test Dice {entry['dice']:.4f} IoU {entry['iou']:.4f} pooled {entry['pooled_dice']:.4f}",
              flush=True)
    if not args.no_render:
        render_results(args.results, args.results_md)
    return 0


def merge_result(path: Path, key: str, entry: dict) -> dict:
    """Add one run's entry, re-reading the file under a lock (evaluations may run side by side)."""
    import fcntl
    import json

    from lvit.io import atomic_write_text, read_results_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = read_results_file(path)
        results[key] = entry
        atomic_write_text(path, json.dumps(results, indent=1, sort_keys=True) + "\n")
    return results


def machine() -> str:
    import torch

    from lvit.benchmark import cpu_name

    return f"CPU {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


# --------------------------------------------------------------------------------------------------------------
# The RESULTS.md section, rendered from the raw JSON only

ROW_LABELS = {"lvit": "LViT (24 tokens: whole report)", "lvit-10tok": "LViT (official 10 tokens)",
              "lvit-t": "LViT-T (no text)", "unet": "U-Net (no text)"}
PUBLISHED = {"lvit": "83.66 / 75.11", "lvit-t": "81.12 / 71.37 (LViT without text)", "unet": "79.02 / 69.46"}


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{sum(values) / len(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def render_results(results_path: Path, md_path: Path) -> str:
    from lvit.io import read_results_file, write_marked_section

    results = read_results_file(results_path)
    if not results:
        return ""
    by_row: dict[str, list[dict]] = {}
    for name in sorted(results, key=lambda n: (list(ROWS).index(results[n]["row"]), results[n]["seed"])):
        by_row.setdefault(results[name]["row"], []).append(results[name])
    any_r = next(iter(results.values()))
    lines = [
        "## QaTa-COV19 (real chest X-rays with LViT's reports) on the CPU",
        "",
        f"Preset `{PRESET}` for every row ({any_r['image_size']} px, base width {any_r['base_channels']}, batch 8, "
        "Adam lr 1e-3, one cosine cycle T_0 = 10, augmentation on, no horizontal flips, MiniLM text), trained on the "
        "whole training split (5,716 images) and validated on the 1,429 validation images; test figures on all "
        f"{any_r['n_test']} test images with the best-validation weights, at threshold 0.5 and the model's "
        "resolution (ground truth resized, as the official test code). Per-image = mean over images (the paper's "
        "figure); pooled = all test pixels as one mask (GuideDecoder's and SGSeg's figure). Several seeds: mean "
        "(min-max).",
        "",
        "| model | seeds | test Dice (per image) | test IoU (per image) | pooled Dice | pooled IoU | params | "
        "epochs | train minutes / run | published (224 px, full scale) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, entries in by_row.items():
        lines.append(
            f"| {ROW_LABELS[row]} | {', '.join(str(e['seed']) for e in entries)} | "
            f"{_spread([e['dice'] for e in entries])} | {_spread([e['iou'] for e in entries])} | "
            f"{_spread([e['pooled_dice'] for e in entries])} | {_spread([e['pooled_iou'] for e in entries])} | "
            f"{entries[0]['params'] / 1e6:.2f}M | {entries[0]['epochs']} | "
            f"{sum(e['train_minutes'] for e in entries) / len(entries):.0f} | {PUBLISHED.get(row, '-')} |")
    probes = [(n, r) for n, r in sorted(results.items()) if r.get("probe")]
    if probes:
        lines += [
            "",
            "Text probe: the same LViT weights on the test split with changed reports. \"changed\" = the images "
            "whose report the change alters (a bilateral report naming the same zones on both sides reads the same "
            "after a left/right swap), with the true-report Dice on the same images in brackets.",
            "",
            "| run | true report | left/right swapped: all | swapped: changed reports (true) | shuffled: all | "
            "shuffled: changed (true) | 'No pulmonary infection.' |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in probes:
            v = r["probe"]["variants"]
            sw, sh = v["swapped"], v["shuffled"]
            lines.append(
                f"| {name} | {v['true']['dice']:.4f} | {sw['dice']:.4f} | {sw['changed']['dice']:.4f} "
                f"({sw['changed']['true_dice']:.4f}, n={sw['changed']['n']}) | {sh['dice']:.4f} | "
                f"{sh['changed']['dice']:.4f} ({sh['changed']['true_dice']:.4f}, n={sh['changed']['n']}) | "
                f"{v['no_infection']['dice']:.4f} |")
    machines = sorted({r["machine"] for r in results.values()})
    lines += [
        "",
        f"Machine: {'; '.join(machines)}; two runs side by side, one thread each. Raw results: "
        "`bench/qata_results.json`. Commands (QATA = the `data/QaTa` folder of ShuchangYe-bib/SGSeg): "
        "`python bench/qata.py train --data QATA --work W --runs lvit-s0,lvit-t-s0,lvit-10tok-s0` and "
        "`... --runs lvit-s1,lvit-t-s1,unet-s0` side by side, then `python bench/qata.py evaluate --data QATA --work W`.",
    ]
    section = "\n".join(lines)
    write_marked_section(md_path, "qata", section)
    return section


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) runs")
    t.add_argument("--data", type=Path, required=True, help="QaTa-COV19 root (either layout)")
    t.add_argument("--work", type=Path, required=True, help="folder for the run folders (outside the repository)")
    t.add_argument("--runs", required=True, help="comma-separated <row>-s<seed>, rows: " + ", ".join(ROWS))
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    t.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    e = sub.add_parser("evaluate", help="test every finished run (and probe the text models' reports)")
    e.add_argument("--data", type=Path, required=True, help="QaTa-COV19 root (either layout)")
    e.add_argument("--work", type=Path, required=True)
    e.add_argument("--runs", default=None, help="only these runs (default: every finished run in WORK/runs)")
    e.add_argument("--again", action="store_true", help="evaluate runs already in the results file again")
    e.add_argument("--no-render", action="store_true", help="leave RESULTS.md alone")
    e.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("render", help="write the RESULTS.md section from the results file")
    for q in (e, r):
        q.add_argument("--results", type=Path, default=RESULTS_JSON, help="raw results JSON")
        q.add_argument("--results-md", type=Path, default=RESULTS_MD, help="Markdown file to write the section into")
    r.set_defaults(threads=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "render":
        print(render_results(args.results, args.results_md))
        return 0
    return {"train": train_runs, "evaluate": evaluate_runs}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
