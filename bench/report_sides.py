"""How much the report could still teach a trained model's masks: the report as a weak label, measured.

    python bench/report_sides.py --data QATA --work W --runs lvit-25-steps-s0,lvit-rd25-e30-s0 [--split test]

A candidate of issue "Semi-supervised learning that pays" is to use the report of an unlabelled image as a weak
label: the predicted mask's sides and zones must agree with the report's. Before building a loss for it, this
script bounds what it can give. It reads the masks a run's ``lvit test`` wrote (``RUN/test-<split>/masks``, at the
original resolution; run ``bench/qata.py evaluate`` first) and applies the report to them as a hard rule:

* ``sides``: every predicted pixel on a side (the image's half, :func:`lvit.data.describe.side_edge`) that the true
  report does not name is removed;
* ``sides+upper``: also every pixel in the upper band (:func:`lvit.data.describe.band_edges`) of a named side whose
  upper zone the report does not name (the zone the describe rule places with least doubt).

Per-image Dice at the original resolution before and after each rule, and how many masks each rule changes: how
much of a model's error the report's sides and zones can reach at all. A pseudo-label correction by the same rule
would change the same few labels (a teacher reads the report as the tested model does), so a small figure here
says that such a loss has little to teach.
Raw: ``bench/report_sides.json`` (one entry per run and split); section ``report-sides`` of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from benchkit import add_data_args, add_results_args, read_raw, render_section, run_folder, write_raw

RESULTS_JSON = Path(__file__).resolve().parent / "report_sides.json"
RULES = ("sides", "sides+upper")


def apply_rule(pred: np.ndarray, zones: frozenset, rule: str) -> np.ndarray:
    """``pred`` [H, W] bool with the pixels the report rules out removed (``zones``: the report's (level, side)
    pairs; an empty set rules out nothing: a report naming no zone says nothing about where)."""
    from lvit.data.describe import band_edges, side_edge

    if not zones:
        return pred
    out = pred.copy()
    height, width = pred.shape
    edge = side_edge(width)
    upper_end, _ = band_edges(height)
    for side, columns in (("left", slice(0, edge)), ("right", slice(edge, width))):
        if not any(s == side for _, s in zones):
            out[:, columns] = False
        elif rule == "sides+upper" and ("upper", side) not in zones:
            out[:upper_end, columns] = False
    return out


def measure(run_dir: Path, data: Path, split: str) -> dict:
    from PIL import Image

    from lvit.core.metrics import dice_iou
    from lvit.data import load_split
    from lvit.data.describe import parse_findings
    from lvit.data.readers import read_mask

    masks = run_dir / f"test-{split}" / "masks"
    if not masks.is_dir():
        raise SystemExit(f"error: {masks}: no masks (run `python bench/qata.py evaluate` for this run first)")
    records = load_split(data, split)
    before, after = [], {r: [] for r in RULES}
    changed = dict.fromkeys(RULES, 0)
    for record in records:
        path = masks / f"{Path(record.name).stem}.png"
        if not path.is_file():
            raise SystemExit(f"error: {path}: missing (the run was tested on another copy of {split})")
        pred = np.asarray(Image.open(path)) > 127
        truth = read_mask(record.mask_path).astype(bool)
        zones = parse_findings(record.text).zones
        before.append(dice_iou(pred, truth)[0])
        for rule in RULES:
            fixed = apply_rule(pred, zones, rule)
            changed[rule] += int((fixed != pred).any())
            after[rule].append(dice_iou(fixed, truth)[0])
    return {"run": run_dir.name, "split": split, "n_images": len(records),
            "dice_original": float(np.mean(before)),
            "after": {r: float(np.mean(after[r])) for r in RULES},
            "masks_changed": changed}


def render(results: list[dict], md: Path) -> str:
    lines = ["## The report as a weak label: what it could still correct", "",
             "A trained model's own test masks (original resolution, threshold 0.5) with the pixels the true report "
             "rules out removed: `sides` removes a side the report does not name, `sides+upper` also the upper band "
             "of a named side without an upper zone (describe's bands). Per-image Dice; \"changed\" = masks the rule "
             "alters: how much of the error the report's sides and zones reach at all, and so what a pseudo-label "
             "correction by the same rule could teach (bench/report_sides.py).", "",
             "| run | split | images | Dice | Dice, sides rule (changed) | Dice, sides+upper rule (changed) |",
             "|---|---|---|---|---|---|"]
    for e in results:
        lines.append(f"| {e['run']} | {e['split']} | {e['n_images']} | {e['dice_original']:.4f} | "
                     + " | ".join(f"{e['after'][r]:.4f} ({e['after'][r] - e['dice_original']:+.4f}; "
                                  f"{e['masks_changed'][r]})" for r in RULES) + " |")
    lines += ["", "Commands: " + "; ".join(f"`{e['command']}`" for e in results) + " (masks from "
              "`python bench/qata.py evaluate`; no model runs here, so no machine figure)."]
    body = "\n".join(lines)
    render_section("report-sides", body, md)
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser)
    add_results_args(parser, RESULTS_JSON)
    parser.add_argument("--runs", required=True, help="comma-separated run names under WORK/runs")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    args = parser.parse_args(argv)
    results = read_raw(args.results, [])
    for name in args.runs.split(","):
        started = time.perf_counter()
        entry = measure(run_folder(args.work, name), args.data, args.split)
        entry["command"] = (f"python bench/report_sides.py --data QATA --work W --runs {name}"
                            + (f" --split {args.split}" if args.split != "test" else ""))
        results = [e for e in results if (e["run"], e["split"]) != (name, args.split)] + [entry]
        print(f"{name} ({args.split}): Dice {entry['dice_original']:.4f}; "
              + ", ".join(f"{r} {entry['after'][r]:.4f} ({entry['masks_changed'][r]} masks changed)" for r in RULES)
              + f"; {time.perf_counter() - started:.0f} s", flush=True)
    write_raw(args.results, results)
    render(results, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
