"""QaTa-COV19 at the paper's settings on one GPU, within a wall-clock deadline: step 2 of bench/gpu/qata.sh.

For each model (``--models lvit[,lvit-t,unet]``, one after another, the time left shared equally): train with the
preset ``qata-gpu`` (the ``qata`` preset's recipe: 224 px, base width 64, batch 24, Adam 3e-4, cosine warm
restarts T_0 = 10, 0.5 Dice + 0.5 BCE, MiniLM 10 tokens; plus the fast GPU path) until the next epoch would pass
the model's deadline, then test the best-validation weights on the 2,113 test images with ``lvit test``'s code
(per-image mean and pooled Dice/IoU). The torch.compile mode is the fastest fast-path step of the speed run that
passed its check (``--bench-json``; CUDA graphs when ``+cuda-graphs``/``+gpu-data`` won).

Writes ``RUNS/<model>/`` (run folder, ``test-test/metrics.json``), ``RUNS/qata_gpu_results.json`` and the section
``qata-gpu`` of ``--results-md`` (a copy of bench/RESULTS.md) with the learning curve ``qata_gpu_curve.png``
beside it. ``--dry-run``: 64 px, base width 8, batch 4, two epochs, on the CPU (compile backend: see DRY).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[2]
SECTION = "qata-gpu"
PUBLISHED = {"lvit": (83.66, 75.11), "lvit-t": (81.12, 71.37), "unet": (79.02, 69.46)}  # per-image mean, %
LABELS = {"lvit": "LViT", "lvit-t": "LViT without text (LViT-T)", "unet": "U-Net"}
STEP_MODES = {"bf16+channels_last": ("none", False), "+fused": ("none", True), "+compile": ("default", True),
              "+cuda-graphs": ("reduce-overhead", True), "+gpu-data": ("reduce-overhead", True)}
# --dry-run: toy scale on the CPU, the whole fast path whatever the speed run picked. Compile backend
# aot_eager_decomp_partition (Dynamo + AOTAutograd with inductor's decompositions and partitioner, run eagerly):
# the closest to inductor that compiles in seconds here. Plain aot_eager fails LViT's backward on the CPU once
# dropout is on (native_dropout_backward's eager output strides differ from the traced ones and a view of it
# raises); with inductor's decompositions it runs.
DRY = ["model.image_size=64", "model.base_channels=8", "model.vit_heads=4", "data.batch_size=4",
       "trainer.max_epochs=2", "trainer.accelerator=cpu", "fast.compile=default", "fast.fused_optimizer=true",
       "fast.compile_backend=aot_eager_decomp_partition", "fast.decode_workers=2"]


class Deadline(pl.Callback):
    """Stop after the epoch whose successor (as long as the median of the last three) would end past ``until``
    (``time.time()``). The first epoch, which compiles, is not used for the prediction once others exist; so that
    there are others, no stop comes before ``min_epochs`` (a speed measurement needs a steady epoch; the caller's
    hard time limit still holds)."""

    def __init__(self, until: float, min_epochs: int = 1):
        self.until, self.min_epochs, self.durations, self.stopped = until, min_epochs, [], False
        self.created = self._last = time.time()  # made just before train() (train_and_test)

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = time.time()
        # Start-up (decoding both splits onto the device, the model, Lightning) shows in no epoch's seconds.
        print(f"training starts {self._last - self.created:.0f} s after train() was called", flush=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        now = time.time()
        self.durations.append(now - self._last)
        self._last = now
        recent = self.durations[1:][-3:] or self.durations
        if len(self.durations) >= self.min_epochs and now + statistics.median(recent) > self.until:
            trainer.should_stop = True
            self.stopped = True


def pick_compile(bench_json: Path | None, budget_s: float, images_per_epoch: int = 5712) -> tuple[dict, str]:
    """Overrides for the fast-path step that the speed run predicts gives the most epochs in ``budget_s``, among
    those that passed their gradient check (all that ran when none did), and why.

    Epoch time = 1.1 x images_per_epoch / its images/s (validation adds ~8%: 1,429 images at inference cost);
    set-up = 1.7 x its compile time (the training graph and, at the first validation, the inference graph)."""
    if bench_json is None or not bench_json.is_file():
        return {}, "no speed run: the preset's compile mode (default)"
    report = json.loads(bench_json.read_text())
    entry = next(iter(report.get("cases", {}).values()), {})
    rows = [(v, r) for v, r in entry.get("training", {}).items()
            if v in STEP_MODES and "images_per_s" in r and not r.get("aborted")]
    checked = [(v, r) for v, r in rows if (r.get("check") or {}).get("ok")]
    pool = checked or rows
    if not pool:
        return {}, "no fast-path step ran in the speed run: the preset's compile mode (default)"

    def epochs(vr):
        variant, res = vr
        setup = 1.7 * (res.get("compile_s") or 0.0) if STEP_MODES[variant][0] != "none" else 0.0
        return (budget_s - setup) / (1.1 * images_per_epoch / res["images_per_s"])

    for vr in pool:
        print(f"  {vr[0]}: {vr[1]['images_per_s']:.0f} images/s, compile {vr[1].get('compile_s') or 0:.0f} s -> "
              f"~{epochs(vr):.0f} epochs in {budget_s:.0f} s", flush=True)
    variant, res = max(pool, key=epochs)
    mode, fused = STEP_MODES[variant]
    why = (f"{variant}, {res['images_per_s']:.0f} images/s in the speed run, predicted the most epochs "
           f"(~{epochs((variant, res)):.0f}) in {budget_s / 60:.1f} min"
           + ("" if checked else "; no step passed its gradient check: chosen among all that ran"))
    return {"fast.compile": mode, "fast.fused_optimizer": str(fused).lower()}, why


def read_curve(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as fh:
        return [{"epoch": int(r["epoch"]), "val_dice": float(r["val_dice"]), "train_loss": float(r["train_loss"]),
                 "seconds": float(r["seconds"])} for r in csv.DictReader(fh)]


def train_and_test(model: str, data: Path, runs: Path, cache: Path, until: float, overrides: list[str],
                   device: str, preset: str = "qata-gpu", name: str | None = None, test: bool = True,
                   min_epochs: int = 1) -> dict:
    from lvit.evaluate.testing import run_test
    from lvit.presets import preset_path
    from lvit.train.config import load_config
    from lvit.train.plugins import Callbacks
    from lvit.train.runner import train

    run_dir = runs / (name or model)
    config = load_config(preset_path(preset), [f"model_name={model}", f"text.cache_dir={cache}",
                                               "trainer.progress=false", *overrides])
    deadline = Deadline(until, min_epochs)
    started = time.time()
    result = train(config, data, run_dir, force=True, plugins=[Callbacks(deadline)])
    train_s = time.time() - started
    tested = time.time()
    metrics = (run_test(run_dir, data, "test", force=True, progress=False, cache_dir=cache, device=device,
                        batch_size=64 if device == "cuda" else 8) if test else None)
    curve = read_curve(run_dir)
    steady = [r["seconds"] for r in curve[1:]] or [r["seconds"] for r in curve]
    per_epoch = statistics.median(steady)
    from lvit.artifacts.runs import read_run_config

    n_train = int(read_run_config(run_dir)["data_info"]["n_train"])
    images = n_train // config.data.batch_size * config.data.batch_size  # training batches drop the last one
    summary = None
    if metrics is not None:
        mr, orig = metrics["model_resolution"], metrics.get("original_resolution", {})
        summary = {"n_images": metrics.get("n_images"), "dice": mr["mean_over_images"]["dice"],
                   "iou": mr["mean_over_images"]["iou"], "pooled_dice": mr["dataset_level"]["dice"],
                   "pooled_iou": mr["dataset_level"]["iou"],
                   "original_resolution_dice": (orig.get("mean_over_images") or {}).get("dice"),
                   "original_resolution_pooled_dice": (orig.get("dataset_level") or {}).get("dice")}
    return {
        "model": model, "name": name or model, "preset": preset, "overrides": overrides, "epochs": result.epochs,
        "best_epoch": result.best_epoch, "best_val_dice": result.best_dice,
        "stopped_by_deadline": deadline.stopped, "stopped_early": result.stopped_early,
        "train_seconds": round(train_s, 1), "first_epoch_seconds": curve[0]["seconds"] if curve else None,
        "median_epoch_seconds": round(per_epoch, 2), "test_seconds": round(time.time() - tested, 1),
        "epoch_images_per_s": round(images / per_epoch, 1),
        "test": summary,
        "curve": curve, "config": {k: v for k, v in config.to_dict()["fast"].items()},
        "precision": config.trainer.precision, "text_tokens": config.model.text_tokens
    }


def half_copy(run_dir: Path, out: Path) -> Path:
    """``out``: the run folder's files (config, curves, vocabulary; no training state) with its best weights rounded
    to float16, the form a model folder ships in."""
    from safetensors.torch import load_file, save_file

    from lvit.artifacts.runs import BEST_WEIGHTS, CKPT_DIR

    (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    for f in run_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    tensors = load_file(str(run_dir / CKPT_DIR / BEST_WEIGHTS))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()},
              str(out / CKPT_DIR / BEST_WEIGHTS))
    return out


def test_half(run_dir: Path, data: Path, cache: Path, device: str) -> dict:
    """Test figures of the best weights rounded to float16 (the shipped form), beside the float32 ones."""
    from lvit.evaluate.testing import run_test

    folder = half_copy(run_dir, run_dir.parent / f"{run_dir.name}.float16")
    metrics = run_test(folder, data, "test", force=True, progress=False, cache_dir=cache, device=device,
                       batch_size=64 if device == "cuda" else 8)
    mr, orig = metrics["model_resolution"], metrics.get("original_resolution", {})
    return {"dice": mr["mean_over_images"]["dice"], "iou": mr["mean_over_images"]["iou"],
            "original_resolution_dice": (orig.get("mean_over_images") or {}).get("dice"),
            "folder": str(folder)}


def plot(results: dict, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for model, r in results.items():
        ax.plot([c["epoch"] for c in r["curve"]], [100 * c["val_dice"] for c in r["curve"]], marker=".",
                label=LABELS.get(r.get("model", model), model))
        pub = PUBLISHED.get(r.get("model", model))
        if pub:
            ax.axhline(pub[0], ls="--", lw=0.8, color="gray")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice (%, per-image mean)")
    ax.set_title("QaTa-COV19, paper settings, one GPU, wall-clock budget")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def render(results: dict, why: str, machine: str, data_note: str, command: str) -> str:
    rows = ["| model | epochs (best) | train wall-clock | s / epoch (first) | images/s (epoch incl. val) "
            "| best val Dice "
            "| test Dice / IoU (per image) | test Dice / IoU (pooled) | published Dice / IoU |",
            "|---|---|---|---|---|---|---|---|---|"]
    for model, r in results.items():
        t, pub = r["test"], PUBLISHED.get(r.get("model", model))
        rows.append(
            f"| {LABELS.get(r.get('model', model), model)} | {r['epochs']} ({r['best_epoch']}) "
            f"| {r['train_seconds'] / 60:.1f} min "
            f"| {r['median_epoch_seconds']:.2f} ({r['first_epoch_seconds']:.0f}) | {r['epoch_images_per_s'] or '-'} "
            f"| {100 * r['best_val_dice']:.2f} | {100 * t['dice']:.2f} / {100 * t['iou']:.2f} "
            f"| {100 * t['pooled_dice']:.2f} / {100 * t['pooled_iou']:.2f} | "
            + (f"{pub[0]:.2f} / {pub[1]:.2f} |" if pub else "- |"))
    tested = sorted({r["test"]["n_images"] for r in results.values() if r["test"]["n_images"] is not None})
    n_test = " / ".join(f"{n:,}" for n in tested) if tested else "?"
    curves = []
    for model, r in results.items():
        points = ", ".join(f"{c['epoch']}: {100 * c['val_dice']:.1f}" for c in r["curve"])
        curves.append(f"- {LABELS.get(r.get('model', model), model)}, validation Dice by epoch: {points}")
    return "\n".join([
        "## QaTa-COV19 at the paper's settings on one GPU (`bench/gpu/qata.sh`)", "",
        (f"Machine: {machine}. Preset `qata-gpu` = `qata` (224 px, base width 64, batch 24, Adam 3e-4, cosine warm "
         "restarts T_0 = 10, eta_min 1e-4, 0.5 Dice + 0.5 BCE, MiniLM text, 10 tokens, seed 666) + the fast GPU path "
         f"(bf16 autocast, channels_last, fused Adam, data on the GPU; compile: {why}). Trained until the next epoch "
         "would pass the run's deadline (not the official up-to-2000 epochs with patience 50), then the "
         f"best-validation weights tested on the {n_test} test images (threshold 0.5; per image = the paper's "
         f"figure, pooled = all test pixels as one mask). Data: {data_note}"), "",
        *rows, "", *curves, "", f"Command: `{command}`; learning curves: `qata_gpu_curve.png`.",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="QaTa-COV19 root (bench/gpu/prepare.py --unpack-qata)")
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--text-cache", type=Path, required=True)
    p.add_argument("--models", default="lvit")
    p.add_argument("--until", type=float, required=True, help="time.time() by which every model's training ends")
    p.add_argument("--bench-json", type=Path, default=None)
    p.add_argument("--results-md", type=Path, default=None, help="a RESULTS.md to write the section into")
    p.add_argument("--data-note", default="")
    p.add_argument("--command", default="bash bench/gpu/qata.sh")
    p.add_argument("--set", action="append", default=[], dest="overrides", help="extra config override")
    p.add_argument("--preset", default="qata-gpu", help="the preset the overrides apply to (default qata-gpu)")
    p.add_argument("--name", default=None,
                   help="run folder and results key (one model only; default: the model's name), e.g. when "
                        "several processes share RUNS")
    p.add_argument("--results-json", type=Path, default=None, help="default: RUNS/qata_gpu_results.json")
    p.add_argument("--min-epochs", type=int, default=1,
                   help="epochs trained before the deadline may stop a run (speed runs: 3, for steady epochs)")
    p.add_argument("--no-test", action="store_true",
                   help="train only (the test split is scored elsewhere, e.g. on its original images)")
    p.add_argument("--test-float16", action="store_true",
                   help="also test the best weights rounded to float16 (RUNS/<name>.float16, the shipped form)")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    extra, why = pick_compile(args.bench_json, (args.until - time.time()) / max(1, len(args.models.split(","))))
    if args.dry_run:
        why += "; overridden by --dry-run: compile default, fused Adam (qata_run.DRY)"
    overrides = [f"{k}={v}" for k, v in extra.items()] + (DRY if args.dry_run else []) + args.overrides
    named = [o.split("=", 1)[1] for o in args.overrides if o.startswith("fast.compile=")]
    if named:  # the last --set wins in the config, and so in the record
        why = f"fast.compile={named[-1]}, set on the command line"
    print(f"compile: {why}; overrides {overrides}", flush=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.name and len(models) != 1:
        p.error("--name names one run: give one model")
    args.runs.mkdir(parents=True, exist_ok=True)
    results_file = args.results_json or args.runs / "qata_gpu_results.json"
    results = {}
    for i, model in enumerate(models):
        key = args.name or model
        left = args.until - time.time()
        until = time.time() + left / (len(models) - i)
        print(f"== {model}: training until {time.strftime('%H:%M:%S', time.localtime(until))} "
              f"({(until - time.time()) / 60:.1f} min)", flush=True)
        try:
            results[key] = train_and_test(model, args.data, args.runs, args.text_cache, until, overrides, device,
                                          preset=args.preset, name=args.name, test=not args.no_test,
                                          min_epochs=args.min_epochs)
        except Exception as exc:  # one model's failure must not lose the others' results
            print(f"{model}: failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            continue
        if args.test_float16 and not args.no_test:
            try:  # a failure here must not lose the float32 result above
                results[key]["test_float16"] = test_half(args.runs / key, args.data, args.text_cache, device)
            except Exception as exc:
                results[key]["test_float16"] = {"error": f"{type(exc).__name__}: {exc}"}
        r = results[key]
        results[key]["compile_choice"] = why
        print(f"{key}: {r['epochs']} epochs (best {r['best_epoch']}, val Dice {r['best_val_dice']:.4f}) in "
              f"{r['train_seconds'] / 60:.1f} min, {r['median_epoch_seconds']:.2f} s/epoch (first "
              f"{r['first_epoch_seconds']:.0f} s)"
              + (f"; test Dice per image {r['test']['dice']:.4f} / pooled {r['test']['pooled_dice']:.4f}, IoU "
                 f"{r['test']['iou']:.4f}" if r["test"] else "; not tested here")
              + (f"; float16 weights {r['test_float16']['dice']:.4f}" if "dice" in r.get("test_float16", {})
                 else ""), flush=True)
        results_file.write_text(json.dumps(results, indent=1))
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (dry run on the CPU)"
    machine = f"{gpu}; torch {torch.__version__}; Python {platform.python_version()}"
    if args.results_md is not None and results and not args.no_test:
        from lvit.core.io import write_marked_section

        png = plot(results, args.results_md.parent / "qata_gpu_curve.png")
        write_marked_section(args.results_md, SECTION, render(results, why, machine, args.data_note, args.command))
        print(f"wrote the section {SECTION} of {args.results_md} and {png}")
    return 0 if len(results) == len(models) else 1


if __name__ == "__main__":
    sys.exit(main())
