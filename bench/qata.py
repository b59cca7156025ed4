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
import json
import os
import sys
from pathlib import Path

from benchkit import REPO, add_data_args, add_results_args, render_section, run_folder, runs_folder

RESULTS_JSON = REPO / "bench" / "qata_results.json"
PRESET = "qata-cpu"
# Row name -> (model, extra config overrides). Every row trains with the same preset and budget.
ROWS: dict[str, tuple[str, list[str]]] = {
    "lvit": ("lvit", []),
    "lvit-10tok": ("lvit", ["model.text_tokens=10"]),
    "lvit-t": ("lvit-t", []),
    "unet": ("unet", []),
    # One model with and without a report (bench/report_optional.py; docs/REPORT_OPTIONAL.md): the report is
    # replaced by a learned "no report" embedding for a quarter of the training samples.
    "lvit-rd25": ("lvit", ["model.report_dropout=0.25"]),
    # report dropout + reworded training reports (lvit.data.wording), and + the report prior (no-report path
    # estimated from the image)
    "lvit-rdw": ("lvit", ["model.report_dropout=0.25", "text.wording_variants=3"]),
    # report dropout + the training reports' word pieces moved by up to 4 empty positions (text.token_shift; every
    # QaTa-COV19 report has at most 20 of the 24 pieces, so no word is ever cut off)
    "lvit-rdts": ("lvit", ["model.report_dropout=0.25", "text.token_shift=4"]),
    # ... and a quarter of the training reports read in a random order (text.token_shuffle): lvit-rdts still paid
    # 0.127 for the test's reordered reports, which a shift cannot teach
    "lvit-rdtsp": ("lvit", ["model.report_dropout=0.25", "text.token_shift=4", "text.token_shuffle=0.25"]),
    "lvit-rdpw": ("lvit", ["model.report_dropout=0.25", "model.report_prior=true", "text.wording_variants=3"]),
    # ... and the report prior alone (no reworded copies): the two levers of lvit-rdpw measured apart
    "lvit-rdp": ("lvit", ["model.report_dropout=0.25", "model.report_prior=true"]),
    # report dropout + distillation of the answer with the report into the no-report answer (loss.distill_weight);
    # -e3: three-epoch pilots (the schedule annealed over 3 epochs) of it and of its report-dropout baseline
    "lvit-rdkd": ("lvit", ["model.report_dropout=0.25", "loss.distill_weight=1.0"]),
    "lvit-rd25-e3": ("lvit", ["model.report_dropout=0.25", "trainer.max_epochs=3", "optim.t0=3"]),
    "lvit-rdkd-e3": ("lvit", ["model.report_dropout=0.25", "loss.distill_weight=1.0", "trainer.max_epochs=3",
                              "optim.t0=3"]),
    # the distillation term from a later epoch only (loss.distill_start_epoch counts from 0): -w1-e3 the pilot,
    # from the 2nd of 3 epochs; -w3 the full run, from the 4th of 10
    "lvit-rdkd-w1-e3": ("lvit", ["model.report_dropout=0.25", "loss.distill_weight=1.0",
                                 "loss.distill_start_epoch=1", "trainer.max_epochs=3", "optim.t0=3"]),
    "lvit-rdkd-w3": ("lvit", ["model.report_dropout=0.25", "loss.distill_weight=1.0", "loss.distill_start_epoch=3"]),
    # Teach the no-report path after the reader is trained: 3 epochs from the shipped reader (qata-lvit) at a
    # fine-tuning rate with report dropout, without (-ft-rd25-e3) and with distillation from a frozen copy of it
    # (loss.distill_teacher): the target is a trained reader's answer from the first step, and the student's
    # updates cannot move it. Measured from the first shipped qata-lvit (10 epochs, weights sha256 39b3b59e...,
    # lvit 1e48ab6 and before); from a later checkout these rows start from the qata-lvit it ships, and the
    # width-32 224 px one does not fit this preset (init_from stops with one line): add --set
    # trainer.init_from=FOLDER --set loss.distill_teacher=FOLDER with a copy of a width-16 128 px folder.
    "lvit-ft-rd25-e3": ("lvit", ["trainer.init_from=qata-lvit", "optim.lr=3e-4", "model.report_dropout=0.25",
                                 "trainer.max_epochs=3", "optim.t0=3"]),
    "lvit-ft-rdkd-e3": ("lvit", ["trainer.init_from=qata-lvit", "optim.lr=3e-4", "model.report_dropout=0.25",
                                 "loss.distill_weight=1.0", "loss.distill_teacher=qata-lvit",
                                 "trainer.max_epochs=3", "optim.t0=3"]),
    "lvit-ft-rdkd-w02-e3": ("lvit", ["trainer.init_from=qata-lvit", "optim.lr=3e-4", "model.report_dropout=0.25",
                                     "loss.distill_weight=0.2", "loss.distill_teacher=qata-lvit",
                                     "trainer.max_epochs=3", "optim.t0=3"]),
    # Toward 0.8366 (docs/QATA.md): the validation Dice still rose at epoch 10, so three times as long, one
    # 30-epoch cosine cycle, with report dropout so that the model also answers without a report
    "lvit-rd25-e30": ("lvit", ["model.report_dropout=0.25", "trainer.max_epochs=30", "optim.t0=30"]),
    # Mirrored training images with their reports' sides swapped (data.hflip_prob): twice the lesion layouts per
    # image; the official recipe never mirrors, and test-time mirroring of a model trained without it lost 0.020
    "lvit-hflip": ("lvit", ["data.hflip_prob=0.5"]),
    # A larger input for both paths: 160 px instead of 128 (1.56x the pixels; each of the four ViT levels sees
    # 10x10 patches instead of 8x8), the report-dropout recipe and 10 epochs, against lvit-rd25 at 128 px
    "lvit-rd25-160": ("lvit", ["model.report_dropout=0.25", "model.image_size=160"]),
    # ... and the shippable candidate if 160 px wins at 10 epochs: one 30-epoch cosine cycle, as lvit-rd25-e30
    "lvit-rd25-160-e30": ("lvit", ["model.report_dropout=0.25", "model.image_size=160", "trainer.max_epochs=30",
                                   "optim.t0=30"]),
    # A quarter of the masks (the subset drawn with the trainer seed), docs/SEMI_SUPERVISED.md:
    "lvit-25": ("lvit", ["semi.mode=none", "semi.labeled_fraction=0.25"]),  # a quarter of the steps
    # labelled batches only, as many steps as the semi runs (a warm-up as long as the run: no pseudo labels)
    "lvit-25-steps": ("lvit", ["semi.mode=epi", "semi.labeled_fraction=0.25", "semi.warmup_epochs=10"]),
    "lvit-25-epi": ("lvit", ["semi.mode=epi", "semi.labeled_fraction=0.25", "semi.warmup_epochs=5"]),
    "lvit-25-epi+lv": ("lvit", ["semi.mode=epi+lv", "semi.labeled_fraction=0.25", "semi.warmup_epochs=5"]),
    # Why EPI + LV does what it does: pseudo labels that follow the predictions (beta 0.5: a time constant of
    # two epochs instead of 100), and a longer warm-up (a better model makes P_0, fewer pseudo-label epochs).
    "lvit-25-epi+lv-beta0.5": ("lvit", ["semi.mode=epi+lv", "semi.labeled_fraction=0.25", "semi.warmup_epochs=5",
                                        "semi.beta=0.5"]),
    "lvit-25-epi+lv-warmup7": ("lvit", ["semi.mode=epi+lv", "semi.labeled_fraction=0.25", "semi.warmup_epochs=7"]),
    # lvit's mean-teacher recipe (docs/SEMI_SUPERVISED.md, "Mean teacher"; bench/semi_recipes.py): the pilot
    # branches from the steps row after its 5th epoch; -w2 starts the teacher after 2 labelled-only epochs.
    "lvit-25-mt": ("lvit", ["semi.mode=mean-teacher", "semi.labeled_fraction=0.25", "semi.warmup_epochs=5"]),
    "lvit-25-mt-w2": ("lvit", ["semi.mode=mean-teacher", "semi.labeled_fraction=0.25", "semi.warmup_epochs=2"]),
    # Diagnostic: the same passes and EMA teacher without the consistency term, so the unlabelled images teach
    # nothing; what it gains over the steps row is the EMA weights' averaging, not the unlabelled data.
    "lvit-25-mt-cw0": ("lvit", ["semi.mode=mean-teacher", "semi.labeled_fraction=0.25", "semi.warmup_epochs=5",
                                "semi.consistency_weight=0"]),
    # A tenth of the masks: the steps-matched baseline and the mean teacher.
    "lvit-10-steps": ("lvit", ["semi.mode=epi", "semi.labeled_fraction=0.1", "semi.warmup_epochs=10"]),
    "lvit-10-mt": ("lvit", ["semi.mode=mean-teacher", "semi.labeled_fraction=0.1", "semi.warmup_epochs=5"]),
    # ... with report-aware CutMix (semi.cutmix): the strong view takes a box from another unlabelled image with
    # the same report, so the unlabelled images teach more than agreement on an intensity-jittered copy.
    "lvit-10-mt-cutmix": ("lvit", ["semi.mode=mean-teacher", "semi.labeled_fraction=0.1", "semi.warmup_epochs=5",
                                   "semi.cutmix=1.0"]),
    # The steps-matched baselines with a weight average (optim.ema_decay, the mean teacher's decay): most of the
    # mean teacher's gain at 25% was the averaging (lvit-25-mt-cw0), so a recipe must beat these, not only the
    # plain steps rows. Trained from scratch: the average acts from the first step, so they cannot branch.
    "lvit-25-steps-ema": ("lvit", ["semi.mode=epi", "semi.labeled_fraction=0.25", "semi.warmup_epochs=10",
                                   "optim.ema_decay=0.99"]),
    "lvit-10-steps-ema": ("lvit", ["semi.mode=epi", "semi.labeled_fraction=0.1", "semi.warmup_epochs=10",
                                   "optim.ema_decay=0.99"]),
    # ... and with every mask, beside lvit-rd25 (toward 0.8366, docs/QATA.md), averaging over ~1,000 steps (about
    # 1.4 of its 715-step epochs) rather than the mean teacher's ~100
    "lvit-rd25-ema": ("lvit", ["model.report_dropout=0.25", "optim.ema_decay=0.999"]),
}
# The qata-semi section's rows (a quarter of the masks); the 10% rows are in bench/semi_recipes.py's section.
QUARTER_ROWS = ("lvit-25", "lvit-25-steps", "lvit-25-epi", "lvit-25-epi+lv", "lvit-25-epi+lv-beta0.5",
                "lvit-25-epi+lv-warmup7", "lvit-25-mt", "lvit-25-mt-w2", "lvit-25-mt-cw0")
SEMI_ROWS = (*QUARTER_ROWS, "lvit-25-steps-ema", "lvit-10-steps", "lvit-10-mt", "lvit-10-mt-cutmix",
             "lvit-10-steps-ema")
# The EPI and mean-teacher rows are their fraction's steps row until their warm-up ends (labelled batches only,
# the same seeded order), so they branch from its state after that epoch (lvit.train.semi.branch): bit-identical
# to training them from scratch.
SHARED_ROWS = {"lvit-25-steps": ("lvit-25-epi", "lvit-25-epi+lv", "lvit-25-epi+lv-beta0.5",
                                 "lvit-25-epi+lv-warmup7", "lvit-25-mt", "lvit-25-mt-w2", "lvit-25-mt-cw0"),
               "lvit-10-steps": ("lvit-10-mt", "lvit-10-mt-cutmix")}
SHARED_ROW = "lvit-25-steps"
BRANCHED_ROWS = SHARED_ROWS[SHARED_ROW]
SHARED_OF = {row: shared for shared, rows in SHARED_ROWS.items() for row in rows}


def warmup_epochs(row: str) -> int:
    return next(int(o.split("=")[1]) for o in ROWS[row][1] if o.startswith("semi.warmup_epochs="))


def keep_after(shared: str) -> tuple[int, ...]:
    """The epochs after which a steps row keeps its state: the warm-ups of the rows that branch from it."""
    return tuple(sorted({warmup_epochs(r) for r in SHARED_ROWS[shared]}))


KEEP_AFTER = keep_after(SHARED_ROW)  # where the 25% steps run keeps its state


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
    from lvit.presets import preset_path
    from lvit.train.config import load_config
    from lvit.train.plugins import Callbacks
    from lvit.train.runner import resume_config, train
    from lvit.train.semi.branch import KeepStateAfter, branch_run, kept_state_dir

    for name in args.runs.split(","):
        row, seed = parse_run(name)
        model, extra = ROWS[row]
        run_dir = run_folder(args.work, name)
        overrides = [f"model_name={model}", f"trainer.seed={seed}", "trainer.progress=false", *extra, *args.set]
        config = load_config(preset_path(PRESET), overrides)
        if finished(run_dir, config.trainer.max_epochs):
            print(f"{name}: finished, skipped", flush=True)
            continue
        shared = run_folder(args.work, f"{SHARED_OF.get(row, SHARED_ROW)}-s{seed}")
        at = config.semi.warmup_epochs
        if row in SHARED_OF and not run_dir.exists() and not args.from_scratch:
            if (kept_state_dir(shared, at) / "last.ckpt").is_file():
                branch_run(shared, at, run_dir, config)
                print(f"{name}: branched from {shared.name} after epoch {at}", flush=True)
            else:
                print(f"{name}: {shared.name} has kept no state after epoch {at} (not trained that far yet?): "
                      "training from scratch", flush=True)
        resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
        print(f"{name}: {'resuming' if resume else 'training'} ({config.trainer.max_epochs} epochs)", flush=True)
        if resume:
            config, _ = resume_config(run_dir, ["trainer.progress=false"])
        plugins = [Callbacks(KeepStateAfter(run_dir, *keep_after(row)))] if row in SHARED_ROWS else []
        result = train(config, args.data, run_dir, resume=resume, force=not resume, plugins=plugins)
        print(f"{name}: best val Dice {result.best_dice:.4f} at epoch {result.best_epoch}, "
              f"{result.seconds / 60:.1f} min", flush=True)
    return 0


def run_facts(run_dir: Path) -> dict:
    """Training facts of a run folder (metrics.csv, checkpoints/last.ckpt): epochs, optimizer steps, best epoch
    and val Dice, minutes of epochs (and each epoch's seconds: a stop or a shared CPU shows there), the validation
    curve, and for semi-supervised runs the pseudo labels' Dice
    against the withheld masks per epoch."""
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: float(r["val_dice"]))
    facts = {"epochs": len(rows), "best_epoch": int(best["epoch"]), "best_val_dice": round(float(best["val_dice"]), 4),
             "train_minutes": round(sum(float(r["seconds"]) for r in rows) / 60, 1),
             "epoch_seconds": [round(float(r["seconds"]), 1) for r in rows],
             "val_dice_per_epoch": [round(float(r["val_dice"]), 4) for r in rows]}
    for column in ("pseudo_dice", "unlabelled_pred_dice"):
        if column in rows[0]:
            facts[f"{column}_per_epoch"] = [round(float(r[column]), 4) if r[column] not in ("", "nan") else None
                                           for r in rows]
    from lvit.train.semi.branch import BRANCH_FILE

    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():  # optimizer steps: the semi table compares recipes at equal steps
        from lvit.artifacts.runs import load_state_file

        facts["steps"] = int(load_state_file(last)["global_step"])
    branch = run_dir / BRANCH_FILE
    if branch.is_file():  # epochs up to the branch point were trained once, in the shared run
        info = json.loads(branch.read_text())
        facts["branched_from"] = {"run": Path(info["source"]).name, "after_epoch": info["after_epoch"]}
    return facts


def evaluate_runs(args) -> int:
    import time

    import yaml

    from lvit.benchmark import machine_line
    from lvit.core.io import read_results_file, update_results_file
    from lvit.evaluate.testing import run_test
    from lvit.evaluate.text_probe import probe_reports
    from lvit.models import build_model, count_parameters
    from lvit.train.config import TrainConfig

    results = read_results_file(args.results)
    runs = sorted(p.name for p in runs_folder(args.work).iterdir() if p.is_dir())
    wanted = set(args.runs.split(",")) if args.runs else None
    for name in runs:
        if wanted is not None and name not in wanted:
            continue
        row, seed = parse_run(name)
        run_dir = run_folder(args.work, name)
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        epochs = int(saved["trainer"]["max_epochs"])
        if not finished(run_dir, epochs):
            print(f"{name}: not finished, skipped", flush=True)
            continue
        if name in results and not args.again:
            facts = run_facts(run_dir)  # training facts only (a figure added to them reaches older entries)
            if any(results[name].get(k) != v for k, v in facts.items()):
                results = update_results_file(args.results, name, {**results[name], **facts})
            print(f"{name}: already evaluated", flush=True)
            continue
        started = time.perf_counter()
        metrics = run_test(run_dir, args.data, "test", run_dir / "test-test", force=True, progress=False,
                           batch_size=32, threshold=0.5)  # the table's protocol, even for a calibrated run
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
            "machine": machine_line(),
        }
        if saved["model_name"] == "lvit" and row not in SEMI_ROWS:  # the semi table compares masks, not texts
            entry["probe"] = probe_reports(run_dir, args.data, "test", batch_size=32)
        entry["evaluate_minutes"] = round((time.perf_counter() - started) / 60, 1)
        results = update_results_file(args.results, name, entry)
        print(f"{name}: test Dice {entry['dice']:.4f} IoU {entry['iou']:.4f} pooled {entry['pooled_dice']:.4f}",
              flush=True)
    if not args.no_render:
        render_results(args.results, args.results_md)
    return 0


# --------------------------------------------------------------------------------------------------------------
# The RESULTS.md section, rendered from the raw JSON only

ROW_LABELS = {"lvit": "LViT (24 tokens: whole report)", "lvit-10tok": "LViT (official 10 tokens)",
              "lvit-t": "LViT-T (no text)", "unet": "U-Net (no text)",
              "lvit-rd25": "LViT, report dropout 0.25 (true reports)",
              "lvit-rdw": "LViT, report dropout 0.25 + reworded training reports (true reports)",
              "lvit-rdpw": "LViT, report dropout 0.25 + report prior + reworded training reports (true reports)",
              "lvit-rdp": "LViT, report dropout 0.25 + report prior (true reports)",
              "lvit-rdts": "LViT, report dropout 0.25 + word pieces shifted by up to 4 (true reports)",
              "lvit-rdtsp": "LViT, report dropout 0.25 + word pieces shifted by up to 4, a quarter shuffled "
                            "(true reports)",
              "lvit-rdkd": "LViT, report dropout 0.25 + distillation into the no-report path (true reports)",
              "lvit-rd25-e3": "LViT, report dropout 0.25, 3-epoch pilot (true reports)",
              "lvit-rdkd-e3": "LViT, report dropout 0.25 + distillation, 3-epoch pilot (true reports)",
              "lvit-rdkd-w1-e3": "LViT, report dropout 0.25 + distillation from epoch 2, 3-epoch pilot (true reports)",
              "lvit-rdkd-w3": "LViT, report dropout 0.25 + distillation from epoch 4 (true reports)",
              "lvit-rd25-e30": "LViT, report dropout 0.25, 30 epochs (true reports)",
              "lvit-rd25-ema": "LViT, report dropout 0.25, EMA of the weights 0.999 (true reports)",
              "lvit-hflip": "LViT, mirrored training images with swapped reports (hflip 0.5)",
              "lvit-rd25-160": "LViT, report dropout 0.25, 160 px input (true reports)",
              "lvit-rd25-160-e30": "LViT, report dropout 0.25, 160 px input, 30 epochs (true reports)",
              "lvit-ft-rd25-e3": "LViT, 3 epochs from qata-lvit with report dropout 0.25 (true reports)",
              "lvit-ft-rdkd-e3": "LViT, 3 epochs from qata-lvit with report dropout 0.25 + distillation from a frozen "
                                 "qata-lvit (true reports)",
              "lvit-ft-rdkd-w02-e3": "LViT, 3 epochs from qata-lvit with report dropout 0.25 + distillation "
                                     "(weight 0.2) from a frozen qata-lvit (true reports)"}
PUBLISHED = {"lvit": "83.66 / 75.11", "lvit-t": "81.12 / 71.37 (LViT without text)", "unet": "79.02 / 69.46"}


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{sum(values) / len(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def _spread_or_dash(values: list[float | None]) -> str:
    """The spread, or "-" where an entry was evaluated before the figure was recorded."""
    return "-" if any(v is None for v in values) else _spread(values)


def render_results(results_path: Path, md_path: Path) -> str:
    from lvit.core.io import read_results_file

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
        f"Preset `{PRESET}` for every row ({any_r['image_size']} px unless the px column says otherwise, base width "
        f"{any_r['base_channels']}, batch 8, "
        "Adam lr 1e-3, one cosine cycle T_0 = 10, augmentation on, no horizontal flips, MiniLM text), trained on the "
        "whole training split (5,716 images) and validated on the 1,429 validation images; test figures on all "
        f"{any_r['n_test']} test images with the best-validation weights, at threshold 0.5 and the model's "
        "resolution (ground truth resized, as the official test code), and per image at the masks' own 224 px "
        "(the model's mask resized up; the figure that compares rows of different px). Per-image = mean over "
        "images (the paper's "
        "figure); pooled = all test pixels as one mask (GuideDecoder's and SGSeg's figure). Several seeds: mean "
        "(min-max).",
        "",
        "| model | px | seeds | test Dice (per image) | test IoU (per image) | pooled Dice | pooled IoU | "
        "test Dice at 224 px (per image) | params | epochs | train minutes / run | published (224 px, full scale) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, entries in by_row.items():
        if row in SEMI_ROWS:
            continue
        lines.append(
            f"| {ROW_LABELS[row]} | {entries[0]['image_size']} | {', '.join(str(e['seed']) for e in entries)} | "
            f"{_spread([e['dice'] for e in entries])} | {_spread([e['iou'] for e in entries])} | "
            f"{_spread([e['pooled_dice'] for e in entries])} | {_spread([e['pooled_iou'] for e in entries])} | "
            f"{_spread_or_dash([e.get('dice_original') for e in entries])} | "
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
    machines: dict[str, list[str]] = {}
    for name, r in sorted(results.items()):
        machines.setdefault(r["machine"], []).append(name)
    lines += [
        "",
        "Tested on (training: the same machine; CPU training differs across machines): " + "; ".join(
            f"{machine}: {', '.join(names)}" for machine, names in sorted(machines.items())) + ". Raw results: "
        "`bench/qata_results.json`. Commands (QATA = the `data/QaTa` folder of ShuchangYe-bib/SGSeg): each run "
        "`python bench/qata.py train --data QATA --work W --runs ROW-sSEED --threads T` (ROW as in bench/qata.py; "
        "the first table was trained as `... --runs lvit-s0,lvit-t-s0,lvit-10tok-s0` and "
        "`... --runs lvit-s1,lvit-t-s1,unet-s0` side by side), then "
        "`python bench/qata.py evaluate --data QATA --work W --runs ROW-sSEED`. Train minutes: the logged wall time "
        "of the run's epochs, including time the CPU was shared with other jobs and, for a run resumed across "
        "sessions, any stop inside an epoch (docs/QATA.md gives each long run's own account).",
    ]
    section = "\n".join(lines)
    render_section("qata", section, md_path)
    curves_png = plot_semi_curves(by_row, md_path.parent / SEMI_CURVES_PNG)
    semi = render_semi(by_row, curves_png)
    if semi:
        render_section("qata-semi", semi, md_path)
        section += "\n\n" + semi
    return section


SEMI_LABELS = {"lvit-25": "supervised, 25% of the masks (a quarter of the steps)",
               "lvit-25-steps": "supervised, 25% of the masks, the semi runs' step count",
               "lvit-25-epi": "25% + EPI pseudo labels", "lvit-25-epi+lv": "25% + EPI + LV loss",
               "lvit-25-epi+lv-beta0.5": "25% + EPI + LV loss, beta 0.5",
               "lvit-25-epi+lv-warmup7": "25% + EPI + LV loss, 7 warm-up epochs",
               "lvit-25-mt": "25% + mean teacher (lvit's recipe), 5 warm-up epochs",
               "lvit-25-mt-w2": "25% + mean teacher (lvit's recipe), 2 warm-up epochs",
               "lvit-25-mt-cw0": "25% + the mean teacher's EMA weights without its consistency term (diagnostic)",
               "lvit-10-steps": "supervised, 10% of the masks, the semi runs' step count",
               "lvit-10-mt": "10% + mean teacher (lvit's recipe), 5 warm-up epochs",
               "lvit-10-mt-cutmix": "10% + mean teacher with report-aware CutMix, 5 warm-up epochs",
               "lvit-25-steps-ema": "supervised, 25% of the masks, the semi runs' step count, weight average",
               "lvit-10-steps-ema": "supervised, 10% of the masks, the semi runs' step count, weight average",
               "lvit": "supervised, 100% of the masks"}
SEMI_PUBLISHED = {"lvit-25-epi+lv": "80.95", "lvit": "83.66"}


SEMI_CURVES_PNG = "qata_semi_curves.png"


def plot_semi_curves(by_row: dict[str, list[dict]], out: Path) -> Path | None:
    """Validation Dice (left) and, against the withheld masks, the pseudo labels' and the model's own Dice on the
    unlabelled images (right) per epoch, for the semi-supervised rows and the 100% row, one colour per row and one
    line style per seed."""
    rows = [r for r in (*QUARTER_ROWS, "lvit") if by_row.get(r) and r != "lvit-25"]
    if not any(r in QUARTER_ROWS for r in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from lvit.core.io import atomic_path

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    styles = ("-", "--", ":", "-.")
    for colour, row in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], rows):
        for e in by_row[row]:
            label = f"{SEMI_LABELS[row]}, seed {e['seed']}"
            style = styles[e["seed"] % len(styles)]
            val = e.get("val_dice_per_epoch")
            if not val:  # an entry evaluated before the curves were recorded
                continue
            left.plot(range(1, len(val) + 1), val, style, color=colour, marker=".", label=label)
            pseudo = e.get("pseudo_dice_per_epoch") or []
            points = [(i + 1, v) for i, v in enumerate(pseudo) if v is not None]
            if points:
                right.plot(*zip(*points), style, color=colour, marker="o", label=f"{label}: pseudo labels")
            own = [(i + 1, v) for i, v in enumerate(e.get("unlabelled_pred_dice_per_epoch") or []) if v is not None]
            if own:
                right.plot(*zip(*own), style, color=colour, marker="x", alpha=0.5, lw=1,
                           label=f"{label}: the model's prediction")
    for ax, title in ((left, "validation Dice (1,429 val images)"),
                      (right, "Dice vs the withheld masks of the 4,287 unlabelled images")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    right.set_xlim(left.get_xlim())  # the same epochs under both panels
    left.legend(fontsize=7, loc="best")
    if right.lines:
        right.legend(fontsize=6, loc="best")
    fig.suptitle("LViT on QaTa-COV19 with a quarter of the masks (CPU preset qata-cpu)", fontsize=11)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def _rerun_branch_notes(by_row: dict[str, list[dict]]) -> list[str]:
    """Branched runs measured on another machine than the run they branched from as the table now holds it: that
    run was trained again there, so they continued an earlier copy of it (CPU training is bit-identical on one
    machine only, so the two copies differ)."""
    runs = {f"{row}-s{e['seed']}": e for row, es in by_row.items() for e in es}
    moved: dict[tuple[str, str, str], list[str]] = {}
    for name, e in sorted(runs.items()):
        source_name = (e.get("branched_from") or {}).get("run")
        source = runs.get(source_name)
        if source is not None and source.get("machine") != e.get("machine"):
            moved.setdefault((source_name, e.get("machine"), source.get("machine")), []).append(name)
    return ["", *(f"{', '.join(names)}: measured on {theirs}; they branched from a copy of {source} trained there, "
                  f"while the {source} in this table was trained again on {now} (CPU training is bit-identical on "
                  "one machine only; the earlier copy's figures are in the raw file's history)."
                  for (source, theirs, now), names in sorted(moved.items()))] if moved else []


def render_semi(by_row: dict[str, list[dict]], curves_png: Path | None = None) -> str:
    """The semi-supervised table (issue "Semi-supervised on real data"), from the same raw results."""
    if not any(row in by_row for row in QUARTER_ROWS):
        return ""

    def mean(entries, key):
        return sum(e[key] for e in entries) / len(entries)

    lines = [
        "## Semi-supervised LViT on QaTa-COV19 (a quarter of the masks) on the CPU",
        "",
        f"Preset `{PRESET}` and budget of the table above (10 epochs, each as many batches as the whole training "
        "split unless the row says otherwise). A quarter of the training masks (1,429 of 5,716, drawn with the "
        "trainer seed) is kept; the other images are used with their reports only. EPI: 5 supervised warm-up "
        "epochs on labelled batches, then pseudo labels P_t = 0.99 P_(t-1) + 0.01 prediction from the warm-up "
        "model's eval-mode prediction; LV loss weight 0.1 with the labelled images' masks as contrast labels. Test: "
        "all 2,113 test images, per-image mean and pooled Dice at 0.5, with each run's best-validation weights (an "
        "epoch before the pseudo labels start when none after it validated better). Pseudo Dice: the last epoch's "
        "pseudo labels against the withheld masks.",
        "",
        "| setting | seeds | test Dice (per image) | test IoU | pooled Dice | pseudo-label Dice, last epoch | "
        "best-validation epoch (the weights tested) | published (full scale) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in (*QUARTER_ROWS, "lvit"):
        entries = by_row.get(row)
        if not entries:
            continue
        pseudo = [e["pseudo_dice_per_epoch"][-1] for e in entries
                  if e.get("pseudo_dice_per_epoch") and e["pseudo_dice_per_epoch"][-1] is not None]
        lines.append(
            f"| {SEMI_LABELS[row]} | {', '.join(str(e['seed']) for e in entries)} | "
            f"{_spread([e['dice'] for e in entries])} | {_spread([e['iou'] for e in entries])} | "
            f"{_spread([e['pooled_dice'] for e in entries])} | {_spread(pseudo) if pseudo else '-'} | "
            f"{', '.join(str(e['best_epoch']) for e in entries)} | {SEMI_PUBLISHED.get(row, '-')} |")
    lo, hi = by_row.get("lvit-25-steps"), by_row.get("lvit")
    if lo and hi and mean(hi, "dice") > mean(lo, "dice"):
        parts = []
        for row in BRANCHED_ROWS:
            if by_row.get(row):
                closed = (mean(by_row[row], "dice") - mean(lo, "dice")) / (mean(hi, "dice") - mean(lo, "dice"))
                parts.append(f"{SEMI_LABELS[row]}: {100 * closed:.0f}%")
        if parts:
            lines += ["", "Share of the gap between 25% (same step count) and 100% of the masks closed, mean over "
                      "seeds: " + "; ".join(parts) + "."]
    if curves_png is not None:
        lines += ["", f"![Validation Dice and pseudo-label Dice per epoch]({curves_png.name})"]
    curves = [(n, e) for n, es in by_row.items() if n in QUARTER_ROWS for e in es
              if any(v is not None for v in e.get("pseudo_dice_per_epoch") or [])]
    if curves:
        lines += ["", "Per epoch from the first with pseudo labels, against the withheld masks of the unlabelled "
                  "images: the pseudo labels' Dice, and in brackets the Dice of the model's own prediction on the same "
                  "images in that epoch (train mode, no augmentation):", ""]
        for row, e in curves:
            own = e.get("unlabelled_pred_dice_per_epoch") or [None] * len(e["pseudo_dice_per_epoch"])
            first = next(i for i, v in enumerate(e["pseudo_dice_per_epoch"]) if v is not None)
            values = ", ".join(f"{v:.3f}" + (f" ({o:.3f})" if o is not None else "")
                               for v, o in zip(e["pseudo_dice_per_epoch"][first:], own[first:]))
            lines.append(f"- {row}-s{e['seed']}, epochs {first + 1}-{len(e['pseudo_dice_per_epoch'])}: {values}")
    branched = sorted(f"{row}-s{e['seed']} (after epoch {e['branched_from']['after_epoch']})"
                      for row, es in by_row.items() for e in es if e.get("branched_from"))
    if branched:
        lines += ["", f"Branched runs: {', '.join(branched)}. Until that epoch each is the "
                  f"{SEMI_LABELS[SHARED_ROW]} run of the same seed (labelled batches only, the same seeded order), "
                  "trained once and continued from its kept state (`lvit.train.semi.branch`; a test checks that a "
                  "branched run equals the run from scratch bit for bit); their train minutes include those shared "
                  "epochs."]
        lines += _rerun_branch_notes(by_row)
    diagnostic = sorted(f"{row}-s{e['seed']}" for row, es in by_row.items() for e in es
                        if row in QUARTER_ROWS and row not in ("lvit-25", SHARED_ROW, "lvit-25-epi", "lvit-25-epi+lv"))
    lines += ["", f"Commands: `python bench/qata.py train --data QATA --work W --runs {SHARED_ROW}-s0,{SHARED_ROW}-s1` "
              f"(each keeps its state after epochs {' and '.join(map(str, KEEP_AFTER))}), then "
              "`... --runs lvit-25-epi-s0,lvit-25-epi+lv-s0` and the same with `-s1`"
              + (f", and the other rows above `... --runs {','.join(diagnostic)}` (branched from it)" if diagnostic
                 else "") + ", then "
              "`python bench/qata.py evaluate --data QATA --work W` (raw results: `bench/qata_results.json`)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) runs")
    add_data_args(t)
    t.add_argument("--runs", required=True, help="comma-separated <row>-s<seed>, rows: " + ", ".join(ROWS))
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    t.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    t.add_argument("--from-scratch", action="store_true",
                   help=f"train {', '.join(SHARED_OF)} from scratch even when the steps run of their fraction "
                        f"({', '.join(SHARED_ROWS)}) and seed has kept its state at their warm-up's end (default: "
                        "branch from it)")
    e = sub.add_parser("evaluate", help="test every finished run (and probe the text models' reports)")
    add_data_args(e)
    e.add_argument("--runs", default=None, help="only these runs (default: every finished run in WORK/runs)")
    e.add_argument("--again", action="store_true", help="evaluate runs already in the results file again")
    e.add_argument("--no-render", action="store_true", help="leave RESULTS.md alone")
    e.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("render", help="write the RESULTS.md section from the results file")
    for q in (e, r):
        add_results_args(q, RESULTS_JSON)
    r.set_defaults(threads=1)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lvit.core.errors import LvitError

    try:
        if args.command == "render":
            print(render_results(args.results, args.results_md))
            return 0
        return {"train": train_runs, "evaluate": evaluate_runs}[args.command](args)
    except LvitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
