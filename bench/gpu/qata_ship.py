"""The runs of ``bash bench/gpu/qata_ship.sh`` (the shippable width trained on a lent GPU), scored here on the
original QaTa-COV19 test images, and their section of bench/RESULTS.md.

    python bench/gpu/qata_ship.py evaluate --from DIR --data QATA --work W --call LABEL [--threads 2]
    python bench/gpu/qata_ship.py render

``evaluate``: DIR holds what the GPU call returned (``<run>.tar.part-*`` and ``qata_ship.tar.gz``); each run is
unpacked into ``W/<run>`` and tested with ``lvit test``'s code on the 2,113 test images as they are on disk (not
the WebP copy it was trained on), with the true reports and with none (its report-dropout path); a test already
written for the same weights (``metrics.json``'s sha256) is read instead of run again. Writes the call, under
``LABEL``, into ``bench/gpu/results/qata_ship.json`` (``{"calls": [...]}``, one entry per GPU call; a call's
runs are named by seed, so each call is unpacked into its own ``W``). ``render``: the section ``qata-ship-gpu``
of bench/RESULTS.md from it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS_JSON = REPO / "bench" / "gpu" / "results" / "qata_ship.json"
RESULTS_MD = REPO / "bench" / "RESULTS.md"
SECTION = "qata-ship-gpu"
REPORTS = {"true": "test-test", "none": "test-none"}
# Python 3.11.4+ refuses members that would land outside the target; older 3.11 extracts as before.
SAFE = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def unpack(source: Path, work: Path) -> list[str]:
    """Join each run's tar parts and extract it under ``work``; the summary tarball's files go to work/summary."""
    names = sorted({p.name.split(".tar.part-")[0] for p in source.glob("*.tar.part-*")})
    if not names:
        raise SystemExit(f"{source}: no <run>.tar.part-* files (the files bench/gpu/qata_ship.sh returns)")
    for name in names:
        blob = b"".join(p.read_bytes() for p in sorted(source.glob(f"{name}.tar.part-*")))
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(work, **SAFE)
    summary = source / "qata_ship.tar.gz"
    if summary.is_file():
        with tarfile.open(summary) as tar:
            tar.extractall(work / "summary", **SAFE)
    return names


def scored(run: Path, data: Path, reports: str, threads: int) -> dict:
    from lvit.evaluate.testing import run_test

    out = run / REPORTS[reports]
    weights = hashlib.sha256((run / "checkpoints" / "best.safetensors").read_bytes()).hexdigest()
    done = out / "metrics.json"
    if done.is_file():
        metrics = json.loads(done.read_text())
        if metrics.get("weights_sha256") == weights and metrics.get("threshold") == 0.5:
            return metrics
    import torch

    torch.set_num_threads(threads)
    return run_test(run, data, "test", out, force=True, progress=False, reports=reports, threshold=0.5)


def figures(metrics: dict) -> dict:
    model, orig = metrics["model_resolution"], metrics["original_resolution"]
    return {"dice": model["mean_over_images"]["dice"], "iou": model["mean_over_images"]["iou"],
            "pooled_dice": model["dataset_level"]["dice"], "dice_original": orig["mean_over_images"]["dice"],
            "iou_original": orig["mean_over_images"]["iou"], "pooled_dice_original": orig["dataset_level"]["dice"],
            "n_test": metrics["n_scored"]}


def evaluate(args) -> int:
    import yaml

    from lvit.benchmark import machine_line

    names = unpack(args.source, args.work)
    entries = []
    for name in names:
        run = args.work / name
        config = yaml.safe_load((run / "config.yaml").read_text())
        gpu_side = {}
        result = args.work / "summary" / f"result-{name}.json"
        if result.is_file():
            gpu_side = next(iter(json.loads(result.read_text()).values()))
        with (run / "metrics.csv").open(newline="") as fh:
            curve = [{"epoch": int(r["epoch"]), "val_dice": float(r["val_dice"]), "lr": float(r["lr"]),
                      "seconds": float(r["seconds"])} for r in csv.DictReader(fh)]
        entry = {
            "run": name, "seed": int(config["trainer"]["seed"]),
            "base_channels": int(config["model"]["base_channels"]), "image_size": int(config["model"]["image_size"]),
            "text_tokens": int(config["model"]["text_tokens"]),
            "report_dropout": float(config["model"].get("report_dropout") or 0.0),
            "batch_size": int(config["data"]["batch_size"]), "lr": float(config["optim"]["lr"]),
            "ema_decay": float(config["optim"].get("ema_decay") or 0.0), "t0": int(config["optim"]["t0"]),
            "eta_min": float(config["optim"]["eta_min"]),
            "compile": config["fast"]["compile"] if config["fast"]["enabled"] else "off (no fast path)",
            "precision": config["trainer"]["precision"], "overrides": gpu_side.get("overrides"),
            "epochs": len(curve), "best_epoch": max(curve, key=lambda c: c["val_dice"])["epoch"],
            "best_val_dice": max(c["val_dice"] for c in curve), "val_dice_per_epoch": [c["val_dice"] for c in curve],
            "median_epoch_seconds": gpu_side.get("median_epoch_seconds"),
            "train_seconds": gpu_side.get("train_seconds"),
            "weights_sha256": hashlib.sha256((run / "checkpoints" / "best.safetensors").read_bytes()).hexdigest(),
        }
        for reports in REPORTS:
            metrics = scored(run, args.data, reports, args.threads)
            entry[f"test_{reports}_reports"] = figures(metrics)
            print(f"{name}: {reports} reports: per-image Dice {entry[f'test_{reports}_reports']['dice_original']:.4f}"
                  f" at 224x224", flush=True)
        entries.append(entry)
    nvidia = (args.work / "summary" / "nvidia-smi.txt")
    gpu = nvidia.read_text().splitlines()[-1].split(",")[0] if nvidia.is_file() else "GPU"
    settings = args.work / "summary" / "settings.json"  # written by the call itself (bench/gpu/qata_ship.sh)
    command = json.loads(settings.read_text())["command"] if settings.is_file() else args.gpu_command
    if not command:
        raise SystemExit(f"{args.source}: no settings.json from the GPU call: give --gpu-command (how it was run)")
    out = {"call": args.call, "gpu": gpu, "gpu_command": command,
           "test_command": f"python bench/gpu/qata_ship.py evaluate --from DIR --data QATA --work W "
                           f"--call {args.call} --threads {args.threads}",
           "test_machine": machine_line(), "threshold": 0.5, "runs": entries}
    store_call(out)
    print(f"wrote {RESULTS_JSON}")
    return render(args)


def read_calls() -> list[dict]:
    if not RESULTS_JSON.is_file():
        return []
    calls = json.loads(RESULTS_JSON.read_text()).get("calls")
    if calls is None:
        raise SystemExit(f"error: {RESULTS_JSON}: not a list of GPU calls ({{\"calls\": [...]}})")
    return calls


def store_call(call: dict) -> None:
    """Add a call's entry to the JSON, or replace the entry of the same label where it stands."""
    calls = read_calls()
    at = next((i for i, c in enumerate(calls) if c["call"] == call["call"]), len(calls))
    calls[at:at + 1] = [call]
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps({"calls": calls}, indent=1) + "\n")


def shipped_line() -> str:
    """The shipped model's figures at the same threshold, from its raw file (bench/shipped_model.json)."""
    path = REPO / "bench" / "shipped_model.json"
    if not path.is_file():
        return ""
    shipped = json.loads(path.read_text())
    at = shipped.get("at_threshold_0_5") or {}
    if "dice_original" not in at:
        return ""
    none = (at.get("no_report") or {}).get("dice_original")
    return (f" The shipped `qata-lvit` (base width {shipped['base_channels']}, {shipped['image_size']} px, "
            f"{shipped['epochs']} epochs, sha256 {shipped['weights_sha256'][:8]}) at 0.5: {at['dice_original']:.4f} "
            "with the true reports" + (f", {none:.4f} with none" if none is not None else "")
            + " (bench/shipped_model.json).")


def render(args=None) -> int:
    """One table over every call (a row per run) and, per call, its recipe and validation curves."""
    from lvit.core.io import write_marked_section

    calls = read_calls()
    rows = ["| call | run | seed | epochs (best) | s / epoch | best val Dice | test Dice / IoU, true reports "
            "| pooled Dice | test Dice, no report |", "|---|---|---|---|---|---|---|---|---|"]
    for r in calls:
        for e in r["runs"]:
            t, n = e["test_true_reports"], e["test_none_reports"]
            rows.append(f"| {r['call']} | {e['run']} | {e['seed']} | {e['epochs']} ({e['best_epoch']}) "
                        f"| {e['median_epoch_seconds']} | {e['best_val_dice']:.4f} "
                        f"| {t['dice_original']:.4f} / {t['iou_original']:.4f} | {t['pooled_dice_original']:.4f} "
                        f"| {n['dice_original']:.4f} |")
    text = ["## The shippable width at 224 px on one lent GPU (`bench/gpu/qata_ship.sh`)", "",
            "Each call trains the seeds side by side on the one GPU until a wall-clock deadline, on the WebP copy of "
            "the train and val splits (bench/gpu/prepare.py); the runs are tested here on the original test images "
            "at their own size, per-image mean (the paper's figure) and pooled.", "", *rows, ""]
    for r in calls:
        first = r["runs"][0]
        text += [(f"**{r['call']}**: one {r['gpu']} (`{r['gpu_command']}`): LViT, base width {first['base_channels']}, "
                  f"{first['image_size']} px, {first['text_tokens']} tokens, report dropout {first['report_dropout']}, "
                  f"batch {first['batch_size']}, Adam {first['lr']:g}, cosine warm restarts T_0 = {first['t0']} down "
                  f"to {first['eta_min']:g}, weight average {first['ema_decay']}, {first['precision']}, fast-path "
                  f"compile {first['compile']}. Tested on {first['test_true_reports']['n_test']:,} test images, "
                  f"threshold {r['threshold']} (`{r['test_command']}`; {r['test_machine']})."), ""]
        text += [f"- {e['run']}, validation Dice by epoch: "
                 + ", ".join(f"{i + 1}: {v:.3f}" for i, v in enumerate(e["val_dice_per_epoch"])) for e in r["runs"]]
        text += [""]
    text += ["Published (per-image, test): LViT 83.66 / 75.11." + shipped_line()]
    write_marked_section(RESULTS_MD, SECTION, "\n".join(text))
    print(f"wrote the section {SECTION} of {RESULTS_MD}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command_name", required=True)
    e = sub.add_parser("evaluate", help="unpack the GPU call's files, test each run here, write the JSON")
    e.add_argument("--from", dest="source", type=Path, required=True, help="the GPU call's returned files")
    e.add_argument("--data", type=Path, required=True, help="QaTa-COV19 root with the original test images")
    e.add_argument("--work", type=Path, required=True, help="where the runs are unpacked and tested")
    e.add_argument("--call", required=True,
                   help="a label for this GPU call (its entry in the JSON; evaluating it again replaces it)")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--gpu-command", default=None,
                   help="how the GPU call was run, where its files carry no settings.json (calls before it did)")
    sub.add_parser("render", help="the RESULTS.md section from bench/gpu/results/qata_ship.json")
    args = p.parse_args(argv)
    return evaluate(args) if args.command_name == "evaluate" else render(args)


if __name__ == "__main__":
    sys.exit(main())
