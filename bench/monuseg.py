"""Reproduce LViT's published MoNuSeg figures: U-Net, LViT (text) and LViT without text, official settings.

Published (LViT README / paper, 224x224, batch 2, lr 1e-3, test split, mean Dice/IoU over images):

    U-Net                           Dice 76.45  IoU 62.86
    LViT-T (text, BERT-base)        Dice 80.36  IoU 67.31   (the paper's "LViT-T" is the Tiny LViT WITH text)
    LViT-T (text, no pretraining)   Dice 79.98  IoU 66.83

Naming: our ``--model lvit`` is "LViT (text)"; ``--model lvit-t`` is the TEXT-FREE ablation ("LViT without
text"); ``unet`` is the official U-Net baseline.

Each model trains with the ``monuseg`` preset (Adam lr 1e-3, batch 2, 224 px, cosine warm restarts T_0=10
eta_min=1e-4, Dice 0.5 + BCE 0.5, early stopping patience 50, seed 666) plus what the preset cannot express:

* the official augmentation (``Load_Dataset.RandomGenerator``): with p 0.5 a random rot90 and a flip, else with
  p 0.25 a rotation by a random integer angle in [-20, 20) degrees (nearest, zero fill), nothing else;
* masks resized like the official loader (bilinear, then foreground where > 0), for training, validation and
  the test figure ("official protocol");
* a wall-clock budget per model (``--minutes``): a CPU cannot run the official up-to-2000 epochs.

Checkpoints, metrics.csv and test outputs go to ``--runs`` (default ``runs/monuseg`` in the repo, git-ignored).
``--resume`` continues every model from its ``checkpoints/last.ckpt`` with a fresh budget. The learning curve
goes to ``bench/monuseg_curve.png`` and the table into ``bench/RESULTS.md`` between
``<!-- monuseg:start -->`` and ``<!-- monuseg:end -->``.

    nohup nice -n 5 python bench/monuseg.py --minutes 18 > /tmp/monuseg.log 2>&1 &
    python bench/monuseg.py --resume --minutes 120          # continue all three later

Several processes may share one ``--runs`` folder with different ``--models`` (e.g. three models side by side on
one GPU, ``bench/gpu/run.sh``): each merges its own entry into ``results.json``; ``--render-only`` then draws
the curves and writes the section (``--section monuseg-gpu`` keeps the CPU section and writes its own).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from benchkit import REPO

from lvit.core.io import update_results_file
from lvit.presets import preset_path

RESULTS = REPO / "bench" / "RESULTS.md"
CURVE = REPO / "bench" / "monuseg_curve.png"
START, END = "<!-- monuseg:start -->", "<!-- monuseg:end -->"  # the default section (--section monuseg)
MODELS = ("lvit", "lvit-t", "unet")
LABELS = {"lvit": "LViT (text)", "lvit-t": "LViT without text", "unet": "U-Net"}
# Published test figures (Dice, IoU in %): the paper's LViT-T (with text) is our "lvit".
PUBLISHED = {"lvit": (80.36, 67.31), "lvit-t": None, "unet": (76.45, 62.86)}
PUBLISHED_NO_PRETRAIN = (79.98, 66.83)


# --------------------------------------------------------------------------------------------------
# Official-equivalent data handling


class OfficialAugmenter:
    """The official ``RandomGenerator`` on an ``image [C, S, S]`` / ``mask [1, S, S]`` pair (already resized).

    With p 0.5: rot90 by k in {0..3} quarter turns, then a flip along a random axis; otherwise with p 0.5 (0.25
    overall): rotation by an integer angle in [-20, 20) degrees, nearest neighbour, zero fill, same size.
    No intensity changes. Same call signature as :class:`lvit.data.transforms.Augmenter`; ``seed`` makes it
    reproducible (the dataset draws it from torch's RNG, seeded per worker).
    """

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(seed)
        if rng.random() > 0.5:
            k = int(rng.integers(0, 4))
            axis = int(rng.integers(0, 2))  # 0: rows (vertical flip), 1: columns (horizontal flip)
            image = torch.rot90(image, k, dims=(-2, -1)).flip(-2 + axis)
            mask = torch.rot90(mask, k, dims=(-2, -1)).flip(-2 + axis)
        elif rng.random() > 0.5:
            from scipy import ndimage

            angle = int(rng.integers(-20, 20))
            # axes (-2, -1) of [C, H, W]: rotate every channel in the image plane
            image = torch.from_numpy(ndimage.rotate(image.numpy(), angle, axes=(-1, -2), order=0, reshape=False))
            mask = torch.from_numpy(ndimage.rotate(mask.numpy(), angle, axes=(-1, -2), order=0, reshape=False))
        return image.contiguous(), mask.contiguous()


def official_dataset(dataset, augment: bool, limit: int | None):
    """A copy of a training/validation ``SegmentationDataset`` with the official mask resize (bilinear, > 0),
    decoded images kept in memory (1000 px files dominate an epoch otherwise), the official augmentation
    when ``augment``, and only the first ``limit`` records when given (smoke tests)."""
    from lvit.data import SegmentationDataset
    from lvit.data.transforms import AugmentConfig

    n = len(dataset.records) if limit is None else min(limit, len(dataset.records))
    emb = None if dataset.text_emb is None else dataset.text_emb[:n]
    tmask = None if dataset.text_mask is None else dataset.text_mask[:n]
    # An all-zero AugmentConfig switches the dataset's augmentation path on (and hflip off); the official
    # augmenter then replaces lvit's default one.
    aug = AugmentConfig(affine_prob=0.0, intensity_prob=0.0, hflip_prob=0.0) if augment else False
    out = SegmentationDataset(dataset.records[:n], dataset.image_size, emb, tmask, augment=aug,
                              in_channels=dataset.in_channels, mask_resize="official", cache_in_memory=True)
    if augment:
        out.augmenter = OfficialAugmenter()
    return out


def official_data_plugin(limit: int | None = None):
    """A training plug-in (:class:`lvit.train.plugins.TrainingPlugin`) that applies :func:`official_dataset`."""
    from lvit.train.plugins import TrainingPlugin

    class OfficialData(TrainingPlugin):
        def setup(self, config, data, data_root, run_dir, resume):
            if config.data.hflip_prob:
                from lvit.core.errors import ConfigError

                raise ConfigError("data.hflip_prob: the official MoNuSeg augmentation replaces lvit's, and it "
                                  "mirrors without swapping the report; leave data.hflip_prob at 0 here")
            data.train = official_dataset(data.train, augment=config.data.augment, limit=limit)
            data.val = official_dataset(data.val, augment=False, limit=limit)
            return data

    return OfficialData()


# --------------------------------------------------------------------------------------------------
# Train, test, record


@dataclass
class BenchSettings:
    data: Path
    runs: Path
    minutes: float
    max_epochs: int = 2000
    image_size: int = 224
    base_channels: int = 64
    text_encoder: str = "minilm"
    limit: int | None = None  # first N records of every split (smoke tests)
    progress: bool = True


def train_model(s: BenchSettings, model: str, resume: bool = False) -> dict:
    """Train (or continue) one model into ``s.runs/<model>``; returns what this call did."""
    from lvit.train.config import load_config
    from lvit.train.runner import resume_config, train

    run_dir = s.runs / model
    overrides = [f"trainer.max_epochs={s.max_epochs}", f"trainer.progress={str(s.progress).lower()}",
                 "data.num_workers=0", f"text.cache_dir={s.runs / 'text_cache'}"]
    if resume:
        config, _ = resume_config(run_dir, overrides)
    else:
        overrides += [f"model_name={model}", f"model.image_size={s.image_size}",
                      f"model.base_channels={s.base_channels}", f"text.encoder={s.text_encoder}"]
        config = load_config(preset_path("monuseg"), overrides)
    from lvit.train.callbacks import WallClockBudget
    from lvit.train.plugins import Callbacks

    budget = WallClockBudget(s.minutes)
    started = time.perf_counter()
    result = train(config, s.data, run_dir, resume=resume,
                   plugins=[official_data_plugin(s.limit), Callbacks(budget)])
    return {"wall_seconds": time.perf_counter() - started, "epochs": result.epochs,
            "best_epoch": result.best_epoch, "best_val_dice": result.best_dice,
            "stopped_early": result.stopped_early, "stopped_by_budget": budget.stopped}


@torch.no_grad()
def test_model(s: BenchSettings, model: str) -> dict:
    """Best weights of ``s.runs/<model>`` on the test split: the official protocol (masks resized bilinearly
    to the model size and binarised > 0; prediction > 0.5; Dice/IoU per image, mean over images), plus the
    standard ``lvit test`` outputs (nearest-neighbour masks, original-size figures, overlays)."""
    from lvit.core.metrics import SegmentationScores
    from lvit.data import SegmentationDataset, load_split
    from lvit.evaluate.testing import run_test
    from lvit.inference import Segmenter

    run_dir, cache = s.runs / model, s.runs / "text_cache"
    segmenter = Segmenter(run_dir, cache_dir=cache)
    records = load_split(s.data, "test")[: s.limit]
    emb, tmask = segmenter.text_for([r.text for r in records], len(records))
    dataset = SegmentationDataset(records, segmenter.image_size, emb, tmask, in_channels=segmenter.in_channels,
                                  mask_resize="official")
    scores = SegmentationScores()
    for item in dataset:
        text = None if emb is None else item["text"][None]
        text_mask = None if emb is None else item["text_mask"][None]
        logits = segmenter.logits(item["image"][None], text, text_mask)  # [1, 1, S, S]
        scores.add(item["name"], torch.sigmoid(logits[0, 0]) > 0.5, item["mask"][0] > 0.5)
    official = scores.summary()
    standard = {"dice": float("nan"), "iou": float("nan")}
    if s.limit is None:  # lvit test reads the whole split
        m = run_test(run_dir, s.data, "test", force=True, progress=False, cache_dir=cache)
        standard = m["model_resolution"]["mean_over_images"]
    return {"test_dice": official["mean_over_images"]["dice"], "test_iou": official["mean_over_images"]["iou"],
            "test_pooled_dice": official["dataset_level"]["dice"], "n_test": official["n_images"],
            "lvit_test_dice": standard["dice"], "lvit_test_iou": standard["iou"]}


def read_curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(epoch, val Dice, seconds) per finished epoch, from the run's metrics.csv."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [(int(r["epoch"]), float(r["val_dice"]), float(r["seconds"])) for r in csv.DictReader(f)]


def plot_curves(runs: Path, models, out: Path, where: str = "CPU") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lvit.core.io import atomic_path

    curves = {m: read_curve(runs / m) for m in models}
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for m, c in curves.items():
        ax.plot([e for e, _, _ in c], [d * 100 for _, d, _ in c], marker=".", label=LABELS[m])
    for m, pub in PUBLISHED.items():
        if pub and m in curves:
            ax.axhline(pub[0], ls="--", lw=0.8, color="gray")
            ax.annotate(f"published {LABELS[m]} test Dice {pub[0]}", (1, pub[0]), fontsize=7, color="gray",
                        va="bottom")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice (%)")
    ax.set_title(f"MoNuSeg, official settings, {where} wall-clock budget")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def render(results: dict, s: BenchSettings, curve: Path | None, section: str = "monuseg") -> str:
    rows = [("| Model (our name) | Epochs | Best epoch | Train wall-clock | s / epoch | Best val Dice | Test Dice "
             "| Test IoU | "
            "Published Dice / IoU | Gap (Dice) | `lvit test` Dice / IoU |"),
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in MODELS:
        r = results.get(m)
        if not r:
            continue
        pub = PUBLISHED[m]
        pub_s = f"{pub[0]:.2f} / {pub[1]:.2f}" if pub else "not published"
        gap = f"{r['test_dice'] * 100 - pub[0]:+.2f}" if pub else "-"
        rows.append(
            f"| {LABELS[m]} (`{m}`) | {r['epochs']} | {r['best_epoch']} | {r['train_seconds'] / 60:.1f} min | "
            f"{r['train_seconds'] / max(r['epochs'], 1):.3g} | "
            f"{r['best_val_dice'] * 100:.2f} | {r['test_dice'] * 100:.2f} | {r['test_iou'] * 100:.2f} | {pub_s} | "
            f"{gap} | {r['lvit_test_dice'] * 100:.2f} / {r['lvit_test_iou'] * 100:.2f} |")
    any_r = next(iter(results.values()), {})
    minutes = any_r.get("budget_minutes", s.minutes)  # the budget the recorded runs had
    gpu = any_r.get("gpu")
    where = (f"GPU: {gpu} (one process per model, fp32)" if gpu
             else "CPU only (a GPU run, where one was lent, has its own section: monuseg-gpu)")
    data_note = ("" if not any_r.get("data_note") else f" Data: {any_r['data_note']}")
    lines = [
        "## MoNuSeg: reproducing the published figures (`bench/monuseg.py`)" + (", GPU run" if gpu else ""),
        "",
        (f"Machine: {any_r.get('machine', platform.processor() or platform.machine())}; {where}. "
        "Official settings (preset monuseg: 224 px, batch 2, Adam lr 1e-3, "
        "cosine warm restarts T_0=10 eta_min=1e-4, Dice 0.5 + BCE 0.5, seed 666; official augmentation and mask "
        f"resize), but a wall-clock budget of {minutes:g} min per model instead of up to 2000 epochs with "
        f"patience 50. Text encoder for LViT (text): {results.get('lvit', any_r).get('text_encoder', s.text_encoder)} "
        "(MiniLM, 384-d; "
        "the paper: BERT-base, 768-d; no BERT folder exists offline here). Test: 14 images, best-validation "
        "weights, Dice/IoU at 0.5 per image, mean over images, ground truth resized as the official loader "
        "(bilinear, > 0); `lvit test` column: nearest-neighbour ground truth. Published: the paper's LViT-T "
        f"(with text) row; LViT-T without pretraining: {PUBLISHED_NO_PRETRAIN[0]} / {PUBLISHED_NO_PRETRAIN[1]}."
        + data_note),
        "",
        *rows,
        "",
    ]
    notes = [f"- {LABELS[m]}: {results[m]['run_note']}" for m in MODELS if results.get(m, {}).get("run_note")]
    if notes:
        lines += [*notes, ""]
    if curve is not None:
        shown = curve.relative_to(REPO) if curve.is_relative_to(REPO) else curve.name
        lines += [f"Learning curves (validation Dice per epoch): `{shown}`", "",
                  f"![MoNuSeg learning curves]({curve.name})", ""]
    if gpu:
        lines += [("A fixed wall-clock budget, not the official early-stopping run (up to 2000 epochs, patience 50): "
                   "the lent GPU machine is held for 15 minutes per session. Why the figures differ from the paper: "
                   "docs/MONUSEG.md."), "",
                  f"Command: `bench/gpu/run.sh` on the lent machine (MoNuSeg step: `python bench/monuseg.py "
                  f"--minutes {minutes:g} --models M --runs R` once per model, side by side, then "
                  f"`--render-only --section {section}`); data packed by `python bench/gpu/prepare.py`."]
    else:
        lines += [("These are snapshots after very few epochs on a shared 2-core CPU, not converged models: the "
                   "official run trains up to 2000 epochs (early stopping, patience 50). Why the figures differ "
                   "from the paper, and how to continue the runs: docs/MONUSEG.md."), "",
                  (f"Command: `nice -n 5 python bench/monuseg.py --minutes {minutes:g}` "
                   "(continue: `--resume --minutes N`).")]
    return "\n".join(lines)


def write_section(table: str, path: Path = RESULTS, section: str = "monuseg") -> None:
    from lvit.core.io import write_marked_section

    write_marked_section(path, section, table)


def machine() -> str:
    from lvit.benchmark import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def read_results(results_file: Path) -> dict:
    """``results.json`` of a runs folder ({} when absent); a damaged file is a one-line LvitError."""
    from lvit.core.io import read_results_file

    return read_results_file(results_file)


def publish(results: dict, s: BenchSettings, curve_file: Path, results_md: Path, section: str) -> None:
    """Learning-curve PNG + the RESULTS.md section for ``results`` (GPU or CPU wording from the runs' records)."""
    gpu = next((r.get("gpu") for r in results.values() if r.get("gpu")), None)
    png = plot_curves(s.runs, MODELS, curve_file, where="GPU" if gpu else "CPU")
    write_section(render(results, s, png, section), results_md, section=section)
    print(f"wrote {results_md} (section {section}) and {png}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "MoNuSeg"),
                   help="MoNuSeg root in the LViT layout (default: ../shared/datasets/MoNuSeg)")
    p.add_argument("--runs", default=str(REPO / "runs" / "monuseg"), help="run folders (git-ignored by default)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, trained one after another")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget per model (and call)")
    p.add_argument("--epochs", type=int, default=2000, help="epoch cap (official: 2000 with patience 50)")
    p.add_argument("--resume", action="store_true", help="continue each model from checkpoints/last.ckpt")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument("--text-encoder", default="minilm", help="minilm | hf:/path/to/bert-base folder")
    p.add_argument("--limit", type=int, default=None, help="first N images of each split (smoke runs)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--no-write", action="store_true", help="leave bench/RESULTS.md and the curve PNG alone")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--render-only", action="store_true",
                   help="train nothing: draw the curves and write the section from --runs/results.json")
    p.add_argument("--section", default="monuseg",
                   help="RESULTS.md section name (markers <!-- NAME:start/end -->); the curve PNG is named after it")
    p.add_argument("--data-note", default=None, help="a sentence on the data copy used, printed with the table")
    p.add_argument("--results", type=Path, default=RESULTS, help="the RESULTS.md to write (curve PNG beside it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lvit.core.errors import LvitError

    data = Path(args.data)
    curve_file = args.results.parent / (CURVE.name if args.section == "monuseg"
                                        else f"{args.section.replace('-', '_')}_curve.png")
    if args.render_only:
        results_file = Path(args.runs) / "results.json"
        try:
            results = read_results(results_file)
        except LvitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not results:
            print(f"{results_file}: no results to render", file=sys.stderr)
            return 2
        publish(results, BenchSettings(data=data, runs=Path(args.runs), minutes=args.minutes), curve_file,
                args.results, args.section)
        return 0
    if not (data / "Train_Folder").is_dir():
        print(f"{data}: no MoNuSeg here (expected Train_Folder/Val_Folder/Test_Folder); pass --data", file=sys.stderr)
        return 2
    s = BenchSettings(data=data, runs=Path(args.runs), minutes=args.minutes, max_epochs=args.epochs,
                      image_size=args.image_size, base_channels=args.base_channels,
                      text_encoder=args.text_encoder, limit=args.limit, progress=not args.no_progress)
    s.runs.mkdir(parents=True, exist_ok=True)
    results_file = s.runs / "results.json"
    try:
        results = read_results(results_file)
    except LvitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            print(f"--models: unknown model {m!r} (known: {', '.join(MODELS)})", file=sys.stderr)
            return 2
    try:
        for m in models:
            resume = args.resume and (s.runs / m / "checkpoints" / "last.ckpt").is_file()
            if m in results and not args.resume:
                print(f"{m}: already done in {s.runs / m} (use --resume to continue it)", flush=True)
                continue
            print(f"== {LABELS[m]} ({m}): {'resuming' if resume else 'training'}, budget {s.minutes:g} min",
                  flush=True)
            call = train_model(s, m, resume=resume)
            figures = test_model(s, m)
            curve = read_curve(s.runs / m)
            previous = results.get(m, {})
            entry = {
                **call, **figures,
                "train_seconds": sum(sec for _, _, sec in curve),  # all epochs, across resumes
                "calls_wall_seconds": previous.get("calls_wall_seconds", []) + [round(call["wall_seconds"], 1)],
                "text_encoder": s.text_encoder if m == "lvit" else "none",
                "machine": machine(),
                "budget_minutes": s.minutes,
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "data_note": args.data_note,
            }
            results = update_results_file(results_file, m, entry)
            print(f"{m}: {call['epochs']} epochs, best val Dice {call['best_val_dice']:.4f} (epoch "
                  f"{call['best_epoch']}), test Dice {figures['test_dice']:.4f} IoU {figures['test_iou']:.4f}, "
                  f"{call['wall_seconds'] / 60:.1f} min", flush=True)
    except LvitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.no_write:
        publish(results, s, curve_file, args.results, args.section)
    else:
        print(render(results, s, None, args.section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
