"""Semi-supervised LViT on the synthetic dataset: how much of the 25%-vs-100% gap do EPI and the LV loss close?

For each model (LViT, LViT-T) and the same training budget (epochs, optimiser, seed), four runs:

    sup-25     supervised on the 25% labelled subset only
    epi-25     25% labelled + EPI pseudo labels on the other 75%
    epi+lv-25  as epi-25 plus the LV loss (alpha 0.1, contrast labels = the labelled images' masks)
    sup-100    supervised on every mask

Each run's best-validation-Dice weights are scored on the test split (Dice/IoU at 0.5, mean over images).
The table goes into bench/RESULTS.md between <!-- semi:start --> and <!-- semi:end -->.

    nice -n 10 python bench/semi_supervised.py --work /tmp/lvit-semi-bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
SETTINGS = ("sup-25", "epi-25", "epi+lv-25", "sup-100")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/lvit-semi-bench", help="dataset + run folders (outside the repo)")
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
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lvit.data.synthetic import generate_synthetic

    work = Path(args.work)
    data = work / f"synth_{args.size}px_{args.n_train}"
    if not (data / "Train_Folder").is_dir():
        generate_synthetic(data, args.n_train, args.n_val, args.n_test, size=args.size, seed=args.seed, force=True)
    rows = []
    results_file = work / "results.json"
    done = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for model in args.models.split(","):
        for setting in args.settings.split(","):
            key = f"{model}/{setting}/e{args.epochs}/w{args.warmup}/b{args.beta}/s{args.size}" + _lv_tag(args, setting)
            if key not in done:
                done[key] = run_one(args, data, work, model, setting)
                results_file.write_text(json.dumps(done, indent=2))
            rows.append((model, setting, done[key]))
            print(f"{model:6s} {setting:10s} {done[key]}", flush=True)
            if not args.no_write:  # partial tables land as soon as each run finishes
                write_section(render(args, rows))
    table = render(args, rows)
    print(table)
    if not args.no_write:
        write_section(table)
    return 0


def _lv_tag(args, setting: str) -> str:
    """Results key / folder suffix for a non-default LV weight or a pseudo-label threshold (the defaults keep the
    old names)."""
    tag = f"/lv{args.lv_weight:g}" if "lv" in setting.split("-")[0] and args.lv_weight != 0.1 else ""
    if "epi" in setting and getattr(args, "pseudo_threshold", None) is not None:
        tag += f"/t{args.pseudo_threshold:g}"
    return tag


def run_one(args, data: Path, work: Path, model: str, setting: str) -> dict:
    from lvit.train.config import load_config
    from lvit.train.runner import train
    from lvit.train.semi.module import SemiConfig, make_setup_hook

    cfg = load_config(args.config, [
        f"model_name={model}", f"model.image_size={args.size}", f"model.base_channels={args.base_channels}",
        f"data.batch_size={args.batch_size}", "data.num_workers=0", f"trainer.max_epochs={args.epochs}",
        "trainer.patience=null", "trainer.progress=false", f"trainer.seed={args.seed}", f"optim.lr={args.lr}",
    ])
    run_dir = work / "runs" / (f"{model}_{setting}_e{args.epochs}_w{args.warmup}_b{args.beta}"
                               + _lv_tag(args, setting).replace("/", "_"))
    hook = None
    if setting != "sup-100":
        mode = {"sup-25": "none", "epi-25": "epi", "epi+lv-25": "epi+lv"}[setting]
        semi = SemiConfig(mode=mode, labeled_fraction=args.fraction, seed=args.seed, beta=args.beta,
                          warmup_epochs=args.warmup, lv_weight=args.lv_weight,
                          pseudo_threshold=args.pseudo_threshold)
        hook = make_setup_hook(semi)
    started = time.perf_counter()
    result = train(cfg, data, run_dir, force=True, setup_hook=hook)
    seconds = time.perf_counter() - started
    test = score_test(run_dir, cfg, data)
    pseudo = last_metric(run_dir, "pseudo_dice")
    return {"val_dice": round(result.best_dice, 4), "test_dice": round(test[0], 4), "test_iou": round(test[1], 4),
            "pseudo_dice": None if pseudo is None else round(pseudo, 4), "minutes": round(seconds / 60, 1)}


@torch.no_grad()
def score_test(run_dir: Path, cfg, data: Path) -> tuple[float, float]:
    from torch.utils.data import DataLoader

    from lvit.data.layout import load_split
    from lvit.evaluate.metrics import batch_dice_iou
    from lvit.train.checkpoint import load_run
    from lvit.train.datamodule import build_text_encoder, make_dataset, text_cache_dir

    model, _ = load_run(run_dir)
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
    lines = [
        "## Semi-supervised LViT (EPI + LV loss) on the synthetic dataset",
        "",
        f"Synthetic data ({args.n_train} train / {args.n_val} val / {args.n_test} test, {args.size} px, seed "
        f"{args.seed}); base_channels {args.base_channels}, batch {args.batch_size}, Adam lr {args.lr}, "
        f"{args.epochs} epochs for every run (same budget), labelled fraction {args.fraction}, EPI beta "
        f"{args.beta}, {args.warmup} supervised warm-up epochs before pseudo labels, LV weight 0.1 with the "
        "labelled images' masks as contrast labels. Test Dice/IoU: best-validation weights, threshold 0.5, mean "
        "over test images. Pseudo Dice: the last epoch's pseudo labels (thresholded) against the hidden masks.",
        "",
        "| model | setting | test Dice | test IoU | best val Dice | pseudo-label Dice | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, setting, r in rows:
        pd = "-" if r["pseudo_dice"] is None else f"{r['pseudo_dice']:.4f}"
        lines.append(f"| {model} | {setting} | {r['test_dice']:.4f} | {r['test_iou']:.4f} | {r['val_dice']:.4f} "
                     f"| {pd} | {r['minutes']} |")
    gaps = []
    by = {(m, s): r for m, s, r in rows}
    for model in dict.fromkeys(m for m, _, _ in rows):
        lo, hi = by.get((model, "sup-25")), by.get((model, "sup-100"))
        if not lo or not hi or hi["test_dice"] - lo["test_dice"] <= 0:
            continue
        for s in ("epi-25", "epi+lv-25"):
            if (model, s) in by:
                closed = (by[(model, s)]["test_dice"] - lo["test_dice"]) / (hi["test_dice"] - lo["test_dice"])
                gaps.append(f"{model} {s}: {100 * closed:.0f}% of the sup-25 -> sup-100 test-Dice gap closed")
    if gaps:
        lines += ["", "Gap closed: " + "; ".join(gaps) + "."]
    lines += ["", f"Command: `nice -n 10 python bench/semi_supervised.py {' '.join(sys.argv[1:])}` (CPU, "
              f"{args.threads} thread(s), machine shared with other jobs: minutes are indicative)."]
    return "\n".join(lines)


def write_section(table: str) -> None:
    from lvit.io import write_marked_section

    write_marked_section(RESULTS, "semi", table)


if __name__ == "__main__":
    sys.exit(main())
