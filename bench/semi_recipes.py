"""Semi-supervised recipes on QaTa-COV19: each finished and tested run of bench/qata.py as one raw entry.

    python bench/qata.py train --data QATA --work W --runs lvit-25-mt-s0      # and the other runs below
    python bench/qata.py evaluate --data QATA --work W                         # writes W/runs/<run>/test-test/
    python bench/semi_recipes.py --work W                                      # bench/semi_recipes.json + table

Reads every run folder ``W/runs/<row>-s<seed>`` of a semi-supervised row of bench/qata.py (and the 100% row
``lvit``, the target) that has a test evaluation, and the runs of bench/qata_results.json whose folders are gone
(``--earlier``), and writes ``bench/semi_recipes.json``: a list, one entry per run,
with exactly ``method``, ``labelled_fraction``, ``seed``, ``dice_original`` (per-image test Dice at the masks'
original resolution, from ``test-test/metrics.json``), ``pseudo_label_dice_per_epoch`` (metrics.csv
``pseudo_dice``, null where an epoch had none) and ``steps`` (optimizer steps, from ``checkpoints/last.ckpt``).
The table goes into bench/RESULTS.md, section ``semi-recipes``, with the share of the gap between the
steps-matched supervised baseline and full supervision that each recipe closes (the goal: at least half).
Exits 2, writing nothing, when no such run exists.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from benchkit import BENCH, RESULTS_MD, bench_module, render_section, runs_folder

RESULTS_JSON = BENCH / "semi_recipes.json"
SECTION = "semi-recipes"
KEYS = ("method", "labelled_fraction", "seed", "dice_original", "pseudo_label_dice_per_epoch", "steps")
FULL = "supervised-100%"
BASELINE = "supervised-steps"
GOAL = 0.5  # share of the gap to close (issue "Semi-supervised learning that pays on real chest X-rays")
LABELS = {FULL: "supervised, every mask", BASELINE: "supervised, the semi runs' step count (baseline)",
          "supervised-subset": "supervised, one pass over the labelled images per epoch", "epi": "EPI (paper)",
          "epi+lv": "EPI + LV loss (paper)", "mean-teacher": "mean teacher (lvit)",
          "epi+lv-beta0.5": "EPI + LV loss, pseudo labels with beta 0.5",
          "epi+lv-warmup7": "EPI + LV loss, 7 warm-up epochs",
          "mean-teacher-w2": "mean teacher (lvit), 2 warm-up epochs",
          "mean-teacher-cw0": "mean teacher's EMA weights, no consistency term (diagnostic)",
          "mean-teacher-cutmix": "mean teacher (lvit) with report-aware CutMix",
          BASELINE + "-ema": "supervised, the semi runs' step count, weight average (optim.ema_decay 0.99)"}


def _qata():
    return bench_module("qata")


def method_of(row: str) -> str:
    """The recipe a bench/qata.py row trains, without its fraction: lvit-25-epi+lv -> epi+lv, lvit-10-mt ->
    mean-teacher, lvit-25-steps -> supervised-steps, lvit -> supervised-100%."""
    if row == "lvit":
        return FULL
    rest = row.split("-", 2)[2] if row.count("-") >= 2 else ""
    if not rest:
        return "supervised-subset"
    if rest in ("steps", "steps-ema"):
        return BASELINE + rest[len("steps"):]
    return "mean-teacher" + rest[2:] if rest.startswith("mt") else rest


def _fraction(config: dict) -> float:
    semi = config.get("semi") or {}
    fraction = semi.get("labeled_fraction")
    return 1.0 if fraction is None else float(fraction)


def _pseudo_dice(metrics: Path) -> list[float | None]:
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    return [None if r.get("pseudo_dice") in (None, "", "nan") else round(float(r["pseudo_dice"]), 4) for r in rows]


def _row_fraction(row: str) -> float:
    """lvit-25-mt -> 0.25, lvit-10-steps -> 0.1, lvit -> 1.0 (the rows name their fraction in percent)."""
    parts = row.split("-")
    return int(parts[1]) / 100 if len(parts) > 1 and parts[1].isdigit() else 1.0


def collect(work: Path | None, earlier: Path | None = None) -> list[dict]:
    """One entry per run folder of ``work/runs`` with a test evaluation (bench/qata.py evaluate), and per run of
    ``earlier`` (bench/qata.py's raw results) whose folder is not in ``work``: run folders do not outlive the
    machine that trained them, the raw results do (``steps`` is None where an entry did not record them)."""
    import yaml

    from lvit.artifacts.runs import load_state_file

    qata = _qata()
    wanted = set(qata.SEMI_ROWS) | {"lvit"}
    found: dict[str, dict] = {}
    runs = runs_folder(work) if work is not None else None
    for run in sorted(runs.iterdir()) if runs is not None and runs.is_dir() else []:
        row, _, seed = run.name.rpartition("-s")
        test = run / "test-test" / "metrics.json"
        if row not in wanted or not seed.isdigit() or not test.is_file():
            continue
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        dice = json.loads(test.read_text(encoding="utf-8"))["original_resolution"]["mean_over_images"]["dice"]
        state = load_state_file(run / "checkpoints" / "last.ckpt")
        found[run.name] = {"method": method_of(row), "labelled_fraction": _fraction(config), "seed": int(seed),
                           "dice_original": round(float(dice), 4),
                           "pseudo_label_dice_per_epoch": _pseudo_dice(run / "metrics.csv"),
                           "steps": int(state["global_step"])}
    results = json.loads(earlier.read_text(encoding="utf-8")) if earlier is not None and earlier.is_file() else {}
    for name, r in sorted(results.items()):
        if name in found or r.get("row") not in wanted or r.get("dice_original") is None:
            continue
        found[name] = {"method": method_of(r["row"]), "labelled_fraction": _row_fraction(r["row"]),
                       "seed": int(r["seed"]), "dice_original": round(float(r["dice_original"]), 4),
                       "pseudo_label_dice_per_epoch": list(r.get("pseudo_dice_per_epoch") or [None] * r["epochs"]),
                       "steps": r.get("steps")}
    return sorted(found.values(), key=lambda e: (-e["labelled_fraction"], e["method"], e["seed"]))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def machines(earlier: Path | None) -> dict[str, list[str]]:
    """Machine -> the runs of ``earlier`` (bench/qata.py's raw results) of this table's rows tested on it."""
    results = json.loads(earlier.read_text(encoding="utf-8")) if earlier is not None and earlier.is_file() else {}
    wanted = set(_qata().SEMI_ROWS) | {"lvit"}
    by: dict[str, list[str]] = {}
    for name, r in sorted(results.items()):
        if r.get("row") in wanted and r.get("machine"):  # the CPU, not the evaluation's thread count
            by.setdefault(r["machine"].split(", torch")[0], []).append(name)
    return by


def gap_shares(runs: list[dict], baselines: list[dict], full: float) -> list[float]:
    """For each run with a baseline of its own seed (the same labelled images; a semi run branches from it, so the
    same machine too): the share of the gap between that baseline and full supervision the run closes."""
    base_of = {b["seed"]: b["dice_original"] for b in baselines}
    return [(r["dice_original"] - base_of[r["seed"]]) / (full - base_of[r["seed"]])
            for r in runs if r["seed"] in base_of and full > base_of[r["seed"]]]


def render(entries: list[dict], tested_on: dict[str, list[str]] | None = None) -> str:
    def spread(values):
        return f"{values[0]:.4f}" if len(values) == 1 else \
            f"{_mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"

    groups: dict[tuple[float, str], list[dict]] = {}
    for e in entries:
        groups.setdefault((e["labelled_fraction"], e["method"]), []).append(e)
    full = [e["dice_original"] for e in groups.get((1.0, FULL), [])]
    lines = [
        "## Semi-supervised recipes on QaTa-COV19 (CPU scale)",
        "",
        "Preset `qata-cpu` (128 px, base width 16, 10 epochs of as many batches as the whole training split), LViT; "
        "per-image test Dice at the masks' original resolution on all test images, best-validation weights (a mean "
        "teacher's are its teacher's). Baseline: the labelled images only, with the semi runs' step count. Gap "
        "closed: (recipe - the baseline of the same seed, i.e. the same labelled images, trained on the same machine) "
        f"/ (every mask - that baseline), mean over the seeds that have one; the goal is {GOAL:.0%}. Pseudo "
        "labels: their Dice against the withheld masks of the unlabelled training images, first and last epoch "
        "that had them. Raw: `bench/semi_recipes.json` (`bench/semi_recipes.py`).",
        "",
        "| masks | recipe | seeds | test Dice (per image, original size) | gap closed | pseudo-label Dice, first -> "
        "last | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for (fraction, method), group in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1] != BASELINE,
                                                                          kv[0][1])):
        dice = [e["dice_original"] for e in group]
        closed = "-"
        if method not in (BASELINE, FULL) and full:
            shares = gap_shares(group, groups.get((fraction, BASELINE), []), _mean(full))
            closed = f"{_mean(shares):.0%}" if shares else "-"
        pseudo = [[v for v in e["pseudo_label_dice_per_epoch"] if v is not None] for e in group]
        pseudo = "; ".join(f"{p[0]:.3f} -> {p[-1]:.3f}" for p in pseudo if p) or "-"
        label = LABELS.get(method, method)
        steps = ", ".join("-" if e["steps"] is None else str(e["steps"]) for e in group)
        lines.append(f"| {fraction:.0%} | {label} | {', '.join(str(e['seed']) for e in group)} | {spread(dice)} | "
                     f"{closed} | {pseudo} | {steps} |")
    if tested_on:
        lines += ["", "Machines (bench/qata_results.json): " + "; ".join(
            f"{machine}: {', '.join(names)}" for machine, names in sorted(tested_on.items())) + ". CPU training "
            "is bit-identical on one machine, not across machines: compare a recipe with the baseline trained on "
            "the same machine."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="the work folder of bench/qata.py (runs in WORK/runs)")
    parser.add_argument("--earlier", type=Path, default=BENCH / "qata_results.json",
                        help="bench/qata.py's raw results: runs whose folders are gone (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=RESULTS_JSON, help="raw results (a list)")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD, help="Markdown file for the section")
    args = parser.parse_args(argv)
    from lvit.core.errors import LvitError
    from lvit.core.io import atomic_write_json

    try:
        entries = collect(args.work, args.earlier)
    except (LvitError, OSError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not entries:
        print(f"error: {args.work}/runs, {args.earlier}: no tested run of a semi-supervised row (bench/qata.py "
              "train, then evaluate); nothing written", file=sys.stderr)
        return 2
    atomic_write_json(args.json, [{k: e[k] for k in KEYS} for e in entries])
    section = render(entries, machines(args.earlier))
    render_section(SECTION, section, args.results_md)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
