"""Semi-supervised LViT on the synthetic dataset: how much of the 25%-vs-100% gap do EPI and the LV loss close?

For each model (LViT, LViT-T) and the same training budget (epochs, optimiser, seed), four runs:

    sup-25     supervised on the 25% labelled subset only (an epoch = one pass over those images)
    sup-25-steps  the same images with the semi runs' step count: every epoch is N/B labelled batches (what the
               semi runs' warm-up does), never pseudo labels - the semi runs equal it up to the warm-up's end
    epi-25     25% labelled + EPI pseudo labels on the other 75%
    epi+lv-25  as epi-25 plus the LV loss (alpha 0.1, contrast labels = the labelled images' masks)
    mt-25      25% labelled + lvit's mean-teacher recipe (semi.mode mean-teacher, its defaults; not in the default
               list: ``--settings ...,mt-25``)
    sup-100    supervised on every mask

Each run's best-validation-Dice weights are scored on the test split (Dice/IoU at 0.5, mean over images).
The table goes into bench/RESULTS.md between <!-- semi:start --> and <!-- semi:end --> (``--section`` names
another, e.g. ``semi-gpu``).

    nice -n 10 python bench/semi_supervised.py --work /tmp/lvit-semi-bench

Several processes may share one ``--results`` file (one per model/setting, side by side on a GPU): each merges
its row under a lock; ``--render-only`` then writes the table from the file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from benchkit import REPO

RESULTS = REPO / "bench" / "RESULTS.md"
SETTINGS = ("sup-25", "sup-25-steps", "epi-25", "epi+lv-25", "sup-100")
OPTIONAL_SETTINGS = ("mt-25",)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/lvit-semi-bench", help="dataset + run folders (outside the repo)")
    p.add_argument("--data", type=Path, default=None,
                   help="an existing synthetic dataset (default: generate one in --work from the sizes below)")
    p.add_argument("--results", type=Path, default=None, help="results JSON (default: WORK/results.json)")
    p.add_argument("--text-cache", type=Path, default=None, help="text-embedding cache folder (text.cache_dir)")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"), help="trainer.accelerator")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes per run")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock cap per run: stop after the epoch that would overrun it (the table says so)")
    p.add_argument("--models", default="lvit,lvit-t")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--config", default=None,
                   help="base preset (e.g. synth: 24 text tokens, augmentation); the flags below override it")
    p.add_argument("--n-train", type=int, default=48)
    p.add_argument("--n-val", type=int, default=16)
    p.add_argument("--n-test", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--base-channels", type=int, default=8)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--warmup", type=int, default=4, help="supervised epochs before pseudo labels start")
    p.add_argument("--beta", type=float, default=0.99)
    p.add_argument("--lv-weight", type=float, default=0.1, help="alpha of the LV loss (paper: 0.1)")
    p.add_argument("--pseudo-threshold", type=float, default=None,
                   help="train unlabelled images on P_t > T (hard labels) instead of the soft P_t")
    p.add_argument("--mt-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a mean-teacher setting for mt-25 (semi.KEY, e.g. ema_decay=0.95); tagged in its key")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    p.add_argument("--render-only", action="store_true",
                   help="train nothing: write the table of the runs already in --results")
    p.add_argument("--section", default="semi", help="RESULTS.md section to write")
    p.add_argument("--command", default=None, help="the command to quote under the table (default: this one)")
    p.add_argument("--results-md", type=Path, default=RESULTS, help="the Markdown file to write the section into")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lvit.core.errors import LvitError
    from lvit.core.io import read_results_file, update_results_file

    unknown = sorted(set(args.settings.split(",")) - set(SETTINGS) - set(OPTIONAL_SETTINGS))
    if unknown:
        print(f"error: unknown setting(s) {', '.join(unknown)} (choose from "
              f"{', '.join(SETTINGS + OPTIONAL_SETTINGS)})", file=sys.stderr)
        return 2
    work = Path(args.work)
    results_file = args.results or work / "results.json"
    try:
        done = read_results_file(results_file)
        rows = []
        for model in args.models.split(","):
            for setting in args.settings.split(","):
                key = result_key(args, model, setting)
                if key not in done and not args.render_only:
                    entry = run_one(args, dataset(args, work), work, model, setting)
                    done = update_results_file(results_file, key, entry)
                if key in done:
                    rows.append((model, setting, done[key]))
                    print(f"{model:6s} {setting:10s} {done[key]}", flush=True)
                else:
                    print(f"{model} {setting}: no result in {results_file} ({key})", file=sys.stderr)
                # Recorded variants of this run (key + "/tag", e.g. an earlier implementation kept for the record).
                rows += [(model, f"{setting} ({k[len(key) + 1:].replace('/', ', ')})", done[k]) for k in sorted(done)
                         if k.startswith(key + "/")]
                if not args.no_write:  # partial tables land as soon as each run finishes
                    write_section(render(args, rows), args.results_md, args.section)
    except LvitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = render(args, rows)
    print(table)
    if not args.no_write and rows:
        write_section(table, args.results_md, args.section)
    return 0


def dataset(args, work: Path) -> Path:
    """``--data``, or a synthetic set of the requested sizes generated once in ``work``."""
    from lvit.core.errors import LvitError
    from lvit.data.synthetic import generate_synthetic

    if args.data is not None:
        if not (args.data / "Train_Folder").is_dir():
            raise LvitError(f"{args.data}: no Train_Folder here (expected a dataset in the QaTa-COV19 layout)")
        return args.data
    data = work / f"synth_{args.size}px_{args.n_train}"
    if not (data / "Train_Folder").is_dir():
        generate_synthetic(data, args.n_train, args.n_val, args.n_test, size=args.size, seed=args.seed, force=True)
    return data


def result_key(args, model: str, setting: str) -> str:
    return (f"{model}/{setting}/e{args.epochs}/w{args.warmup}/b{args.beta}/s{args.size}/n{args.n_train}"
            + _lv_tag(args, setting))


def _lv_tag(args, setting: str) -> str:
    """Results key / folder suffix for a non-default LV weight or a pseudo-label threshold (the defaults keep the
    old names)."""
    tag = f"/lv{args.lv_weight:g}" if "lv" in setting.split("-")[0] and args.lv_weight != 0.1 else ""
    if "epi" in setting and getattr(args, "pseudo_threshold", None) is not None:
        tag += f"/t{args.pseudo_threshold:g}"
    if setting == "mt-25":
        tag += "".join(f"/{item}" for item in getattr(args, "mt_set", []))
    return tag


def run_one(args, data: Path, work: Path, model: str, setting: str) -> dict:
    from lvit.presets import resolve_config
    from lvit.train.callbacks import WallClockBudget
    from lvit.train.config import load_config
    from lvit.train.plugins import Callbacks
    from lvit.train.runner import train

    overrides = [
        f"model_name={model}", f"model.image_size={args.size}", f"model.base_channels={args.base_channels}",
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.num_workers}",
        f"trainer.max_epochs={args.epochs}", "trainer.patience=null", "trainer.progress=false",
        f"trainer.seed={args.seed}", f"optim.lr={args.lr}", f"trainer.accelerator={args.device}",
    ]
    if args.text_cache is not None:
        overrides.append(f"text.cache_dir={args.text_cache}")
    if setting != "sup-100":
        mode = {"sup-25": "none", "sup-25-steps": "epi", "epi-25": "epi", "epi+lv-25": "epi+lv",
                "mt-25": "mean-teacher"}[setting]
        warmup = args.epochs if setting == "sup-25-steps" else args.warmup  # a warm-up as long as the run
        overrides += [f"semi.mode={mode}", f"semi.labeled_fraction={args.fraction}", f"semi.seed={args.seed}",
                      f"semi.warmup_epochs={warmup}"]
        if mode != "mean-teacher":
            overrides += [f"semi.beta={args.beta}", f"semi.lv_weight={args.lv_weight}"]
        if args.pseudo_threshold is not None and mode != "mean-teacher":
            overrides.append(f"semi.pseudo_threshold={args.pseudo_threshold}")
        if mode == "mean-teacher":
            overrides += [f"semi.{item}" for item in args.mt_set]
    cfg = load_config(resolve_config(args.config), overrides)
    run_dir = work / "runs" / (f"{model}_{setting}_e{args.epochs}_w{args.warmup}_b{args.beta}_n{args.n_train}"
                               + _lv_tag(args, setting).replace("/", "_"))
    budget = [WallClockBudget(args.minutes)] if args.minutes else []
    started = time.perf_counter()
    result = train(cfg, data, run_dir, force=True, plugins=[Callbacks(*budget)])
    seconds = time.perf_counter() - started
    test = score_test(run_dir, cfg, data)
    pseudo = last_metric(run_dir, "pseudo_dice")
    return {"val_dice": round(result.best_dice, 4), "test_dice": round(test[0], 4), "test_iou": round(test[1], 4),
            "pseudo_dice": None if pseudo is None else round(pseudo, 4), "minutes": round(seconds / 60, 1),
            "epochs": result.epochs, "best_epoch": result.best_epoch,
            "stopped_by_budget": bool(budget and budget[0].stopped and result.epochs < args.epochs),
            "machine": machine()}


@torch.no_grad()
def score_test(run_dir: Path, cfg, data: Path) -> tuple[float, float]:
    from torch.utils.data import DataLoader

    from lvit.artifacts.runs import load_run
    from lvit.core.metrics import batch_dice_iou
    from lvit.data.layout import load_split
    from lvit.train.datamodule import build_text_encoder, make_dataset, text_cache_dir

    model = load_run(run_dir).model
    records = load_split(data, "test", seed=cfg.trainer.seed)
    encoder = build_text_encoder(cfg)
    cache = text_cache_dir(cfg, data) if encoder is not None else None
    ds = make_dataset(records, cfg, encoder, cache, augment=False)
    dice, iou = [], []
    for batch in DataLoader(ds, batch_size=16):
        logits = model(batch["image"], batch.get("text"), batch.get("text_mask"))
        d, i = batch_dice_iou(torch.sigmoid(logits) >= 0.5, batch["mask"] > 0.5)
        dice += d.tolist()
        iou += i.tolist()
    return sum(dice) / len(dice), sum(iou) / len(iou)


def last_metric(run_dir: Path, column: str) -> float | None:
    import csv

    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    rows = list(csv.DictReader(path.open()))
    values = [float(r[column]) for r in rows if r.get(column) not in (None, "", "nan")]
    return values[-1] if values else None


def render(args, rows) -> str:
    where = next((r["machine"] for _, _, r in rows if r.get("machine")), "CPU")
    lines = [
        "## Semi-supervised LViT (EPI + LV loss) on the synthetic dataset"
        + (" (GPU)" if "gpu" in args.section else ""),
        "",
        f"Synthetic data ({args.n_train} train / {args.n_val} val / {args.n_test} test, {args.size} px, seed "
        f"{args.seed}); base_channels {args.base_channels}, batch {args.batch_size}, Adam lr {args.lr}, "
        f"{args.epochs} epochs for every run (same budget), labelled fraction {args.fraction} "
        f"({round(args.fraction * args.n_train)} masks), EPI beta {args.beta}, {args.warmup} supervised warm-up "
        f"epochs before pseudo labels, LV weight {args.lv_weight:g} with the labelled images' masks as contrast "
        "labels. Test Dice/IoU: best-validation weights, threshold 0.5, mean over test images. Pseudo Dice: the last "
        "epoch's pseudo labels (thresholded) against the hidden masks.",
        "",
        "| model | setting | test Dice | test IoU | best val Dice (epoch) | pseudo-label Dice | epochs | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, setting, r in rows:
        pd = "-" if r["pseudo_dice"] is None else f"{r['pseudo_dice']:.4f}"
        best = f" ({r['best_epoch']})" if r.get("best_epoch") else ""
        epochs = r.get("epochs", args.epochs)
        epochs = f"{epochs} (wall-clock cap)" if r.get("stopped_by_budget") else f"{epochs}"
        lines.append(f"| {model} | {setting} | {r['test_dice']:.4f} | {r['test_iou']:.4f} | {r['val_dice']:.4f}{best} "
                     f"| {pd} | {epochs} | {r['minutes']} |")
    gaps = []
    by = {(m, s): r for m, s, r in rows}
    for model in dict.fromkeys(m for m, _, _ in rows):
        hi = by.get((model, "sup-100"))
        for s in ("epi-25", "epi+lv-25", "mt-25"):
            if hi is None or (model, s) not in by:
                continue
            parts = []
            # Against both supervised-25% baselines: equal epochs (sup-25) and equal optimizer steps (sup-25-steps).
            for base, what in (("sup-25", "equal epochs"), ("sup-25-steps", "equal steps")):
                lo = by.get((model, base))
                if lo and hi["test_dice"] > lo["test_dice"]:
                    closed = (by[(model, s)]["test_dice"] - lo["test_dice"]) / (hi["test_dice"] - lo["test_dice"])
                    parts.append(f"{100 * closed:.0f}% of the {base} -> sup-100 gap ({what})")
            if parts:
                gaps.append(f"{model} {s}: " + ", ".join(parts))
    if gaps:
        lines += ["", "Gap closed: " + "; ".join(gaps) + "."]
    command = args.command or "python bench/semi_supervised.py " + " ".join(
        a for a in sys.argv[1:] if a != "--render-only")
    lines += ["", f"Command: `{command}`; machine: {where}, {args.threads} thread(s) per run (minutes are "
              "indicative when runs share the machine)."]
    return "\n".join(lines)


def write_section(table: str, path: Path = RESULTS, section: str = "semi") -> None:
    from lvit.core.io import write_marked_section

    write_marked_section(path, section, table)


def machine() -> str:
    """The device the run trained on, in words (GPU name, or CPU model and cores)."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    from lvit.benchmark import cpu_name

    return f"CPU {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
