"""One model with or without a report: each trained QaTa-COV19 model scored under every kind of report it may meet.

    python bench/qata.py train --data QATA --work W --runs lvit-rd25-s0      # the recipe (report dropout 0.25)
    python bench/report_optional.py evaluate --data QATA --work W --runs lvit-rd25-s0,lvit-s0 [--reporter DIR]
    python bench/report_optional.py render

For each run (``W/runs/<name>``; its best-validation weights) on the 2,113 test images, per-image Dice at the
masks' original 224x224 (``dice_original``) with:

* ``true``: the dataset's reports;
* ``none``: no report (the model's no-report path; null for a model without one);
* ``generated``: through the report writer ``--reporter`` (``lvit test --reports generated``: the mean of the
  model's answers with the writer's most likely reports; null without a writer);
* ``self_described``: two passes, no report then a report the model wrote itself: the no-report path's mask (at
  the model's resolution) is described by ``lvit describe``'s rules (sides, count, zones) and the model reads
  that report (``Segmenter(..., no_report_path="self-described")``; null for a model without a no-report path);
* ``rephrased``: the reports reworded by bench/rephrase_reports.py (same facts, other words; seed 0);
* ``swapped_changed`` / ``true_changed``: left and right swapped, and the true reports, on the test reports a swap
  changes (lvit.evaluate.text_probe's rule);
* with ``--by-rule``, ``rephrased_by_rule``: for each rewording rule alone, the images whose report it changes,
  their Dice with the true and with the reworded reports, and how many of those reports run past the model's
  ``text_tokens`` word pieces (which kind of rewording costs the most, and whether cut words explain it).

Raw: bench/report_optional.json (a list, one entry per model); table: bench/RESULTS.md, section
``report-optional``, with LViT-T's figures from bench/qata_results.json beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from benchkit import (
    REPO,
    add_data_args,
    add_results_args,
    bench_module,
    read_raw,
    render_section,
    run_folder,
    write_raw,
)

RESULTS_JSON = REPO / "bench" / "report_optional.json"
QATA_JSON = REPO / "bench" / "qata_results.json"
SECTION = "report-optional"
COLUMNS = ("true", "none", "self_described", "generated", "rephrased", "swapped_changed", "true_changed")
PRESET_EPOCHS = 10  # qata-cpu's; a run with fewer is a pilot (its figures compare only with pilots)
PRESET_IMAGE_SIZE = 128  # qata-cpu's; a run at another input size says so in its recipe
GOALS = {"true": 0.825, "none": 0.79}  # issue "One model, with or without a report"


def recipe_of(config: dict) -> str:
    rate = float(config["model"].get("report_dropout") or 0.0)
    if not rate:
        return "none (always a report)"
    parts = [f"report dropout {rate:g}"]
    if config["model"].get("report_prior"):
        parts.append("report prior")
    variants = int((config.get("text") or {}).get("wording_variants") or 0)
    if variants:
        parts.append(f"{variants} reworded copies per training report")
    shift = int((config.get("text") or {}).get("token_shift") or 0)
    if shift:
        parts.append(f"word pieces shifted by up to {shift} positions")
    shuffle = float((config.get("text") or {}).get("token_shuffle") or 0.0)
    if shuffle:
        parts.append(f"word pieces in a random order with probability {shuffle:g}")
    loss = config.get("loss") or {}
    distill = float(loss.get("distill_weight") or 0.0)
    if distill:
        start = int(loss.get("distill_start_epoch") or 0)  # counted from 0; metrics.csv counts epochs from 1
        teacher = loss.get("distill_teacher")
        parts.append(f"distillation into the no-report path (weight {distill:g}"
                     + (f", from epoch {start + 1}" if start else "")
                     + (f", frozen teacher {teacher})" if teacher else ")"))
    ema = float((config.get("optim") or {}).get("ema_decay") or 0.0)
    if ema:
        parts.append(f"weight average (EMA {ema:g})")
    start_from = (config.get("trainer") or {}).get("init_from")
    if start_from:
        parts[0] = f"from {start_from}: " + parts[0]
    size = int(config["model"].get("image_size") or PRESET_IMAGE_SIZE)
    if size != PRESET_IMAGE_SIZE:
        parts[-1] += f"; {size} px"
    epochs = int((config.get("trainer") or {}).get("max_epochs") or PRESET_EPOCHS)
    if epochs < PRESET_EPOCHS:
        parts[-1] += f"; {epochs}-epoch pilot"
    elif epochs > PRESET_EPOCHS:
        parts[-1] += f"; {epochs} epochs"
    return " + ".join(parts)


def per_image(out: Path) -> dict[str, float]:
    with (out / "per_image.csv").open() as f:
        return {r["name"]: float(r["dice_original"]) for r in csv.DictReader(f) if r.get("dice_original")}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def evaluate_run(run_dir: Path, data: Path, work: Path, reporter: Path | None, pilot: bool = False,
                 by_rule: bool = False) -> dict:
    """The entry of one run; ``pilot``: the true and no-report columns only (what a pilot decides on);
    ``by_rule``: also ``rephrased_by_rule``, the reports reworded by one rule at a time (:func:`rule_costs`)."""
    import yaml

    from lvit.benchmark import machine_line
    from lvit.data import load_split
    from lvit.evaluate.testing import run_test
    from lvit.evaluate.text_probe import meaning_changed, variant_reports
    from lvit.inference import model_has_no_report_path
    from lvit.text import default_cache_dir

    rephrase = bench_module("rephrase_reports")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    texts = [r.text for r in load_split(data, "test")]
    names = [r.name for r in load_split(data, "test")]
    started = time.perf_counter()

    def score(label: str, run=None, **kwargs) -> dict[str, float]:
        out = work / f"{run_dir.name}-{label}"
        # 0.5 for every row (the official test code's), also for a run that lvit calibrate gave its own threshold
        run_test(run if run is not None else run_dir, data, "test", out, force=True, progress=False, batch_size=32,
                 k=0, threshold=0.5, **kwargs)
        print(f"{run_dir.name}: {label} done", flush=True)
        return per_image(out)

    scores = {"true": score("true")}
    if model_has_no_report_path(config):
        scores["none"] = score("none", reports="none")
    if model_has_no_report_path(config) and not pilot:
        from lvit.inference import Segmenter

        scores["self_described"] = score("self_described", reports="none",
                                         run=Segmenter(run_dir, no_report_path="self-described",
                                                       cache_dir=default_cache_dir(data)))
    if reporter is not None and not pilot:
        scores["generated"] = score("generated", reports="generated", reporter=reporter)
    swapped = variant_reports(texts, "swapped")
    changed = [n for n, a, b in zip(names, texts, swapped) if meaning_changed("swapped", a, b)]
    if not pilot:
        reworded, _ = rephrase.rephrase_all(texts, seed=0)
        scores["rephrased"] = score("rephrased", texts=reworded)
        scores["swapped"] = score("swapped", texts=swapped)
    row, _, seed = run_dir.name.rpartition("-s")
    entry = {"model": run_dir.name, "row": row, "seed": int(seed) if seed.isdigit() else None,
             "recipe": recipe_of(config), "n_test": len(scores["true"])}
    for column in ("true", "none", "self_described", "generated", "rephrased"):
        entry[column] = mean(scores[column].values()) if column in scores else None
    entry["swapped_changed"] = mean(scores["swapped"][n] for n in changed) if "swapped" in scores else None
    entry["true_changed"] = mean(scores["true"][n] for n in changed)
    entry["n_changed"] = len(changed)
    entry["reporter"] = str(reporter) if reporter else None
    if "generated" in scores:  # how the writer's path answered: the mean over this many likely reports
        from lvit.inference.segmenter import MIXED_REPORTS

        entry["generated_mixed_reports"] = MIXED_REPORTS
    if by_rule:
        from lvit.text.vocabulary import ReportChecker

        checker = ReportChecker(config, run_dir)
        entry["text_tokens"] = checker.max_tokens
        entry["rephrased_by_rule"] = rule_costs(texts, scores["true"], names, rephrase,
                                                lambda rule, reworded: score(f"rule-{rule}", texts=reworded),
                                                truncated=lambda text: checker.check(text).truncated)
    entry.update(training_facts(run_dir))
    entry["machine"] = machine_line()
    entry["evaluate_minutes"] = round((time.perf_counter() - started) / 60, 1)
    return entry


def rule_costs(texts: list[str], true: dict[str, float], names: list[str], rephrase, score,
               truncated=lambda text: False) -> dict:
    """Per rewording rule of bench/rephrase_reports.py: every test report reworded by that rule alone (seed 0),
    scored by ``score(rule, texts)`` (image name -> Dice); over the images whose report the rule changes (a rule
    that does not apply, such as side-order on one lung, leaves a report as it was): their number, the Dice with
    the true and with the reworded reports, and how many of those reworded reports run past the model's word
    pieces (``truncated(text)``: their cost is partly words the model never sees, not its reading)."""
    costs = {}
    for rule in rephrase.RULES:
        reworded, _ = rephrase.rephrase_all(texts, seed=0, only=rule)
        changed = [(n, b) for n, a, b in zip(names, texts, reworded) if a != b]
        if not changed:
            continue
        scored = score(rule, reworded)
        costs[rule] = {"n_changed": len(changed), "true": mean(true[n] for n, _ in changed),
                       "rephrased": mean(scored[n] for n, _ in changed),
                       "n_truncated": sum(bool(truncated(b)) for _, b in changed)}
    return costs


def training_facts(run_dir: Path) -> dict:
    """The run's validation Dice, validation loss and training loss per epoch (its metrics.csv), as the table's
    notes cite them."""
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {"val_dice_per_epoch": [round(float(r["val_dice"]), 4) for r in rows],
            "val_loss_per_epoch": [round(float(r["val_loss"]), 4) for r in rows],
            "train_loss_per_epoch": [round(float(r["train_loss"]), 4) for r in rows]}


def add_facts(args) -> int:
    """Add the training facts of the runs still in WORK to their entries (no scoring)."""
    results = read_raw(args.results, [])
    for entry in results:
        run_dir = run_folder(args.work, entry["model"])
        if (run_dir / "metrics.csv").is_file():
            entry.update(training_facts(run_dir))
            print(f"{entry['model']}: validation Dice per epoch {entry['val_dice_per_epoch']}", flush=True)
    write_raw(args.results, results)
    return 0


def evaluate(args) -> int:
    import shutil
    import tempfile

    import torch

    if args.pilot and args.by_rule:
        raise SystemExit("error: --by-rule scores the reworded reports, which a --pilot leaves out: give one of them")
    torch.set_num_threads(args.threads)
    results = read_raw(args.results, [])
    work = Path(tempfile.mkdtemp(prefix="lvit-optional-"))
    for name in args.runs.split(","):
        run_dir = run_folder(args.work, name)
        if not (run_dir / "checkpoints" / "best.safetensors").is_file():
            print(f"{name}: no best weights yet, skipped", flush=True)
            continue
        entry = evaluate_run(run_dir, args.data, work, args.reporter, pilot=args.pilot, by_rule=args.by_rule)
        results = [e for e in results if e["model"] != name] + [entry]
        write_raw(args.results, sorted(results, key=lambda e: e["model"]))
        print(f"{name}: " + ", ".join(f"{c} {entry[c]:.4f}" for c in COLUMNS if entry.get(c) is not None), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    render(args)
    return 0


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def render(args) -> int:
    results = read_raw(args.results)
    if not results:
        return 0
    machine = sorted({e["machine"] for e in results})
    lines = [
        "## One model with or without a report (QaTa-COV19, CPU scale)",
        "",
        "Preset `qata-cpu` (128 px, base width 16, 10 epochs, whole training split), best-validation weights, the "
        f"{max(e['n_test'] for e in results):,} test images; per-image Dice at the masks' original 224x224, masks "
        "cut at 0.5 (also for the 30-epoch model `lvit-rd25-e30-s0`, the `qata-lvit` shipped before the width-32 "
        "one, which cut at 0.6) "
        "(`bench/report_optional.py`; raw `bench/report_optional.json`). Columns: the true reports; no report "
        "(the model's learned no-report path); self-described: the no-report mask described by `lvit describe`'s "
        "rules and read back as the report (two passes); "
        "generated: through the report writer (`lvit test --reports generated`: the mean of the model's answers "
        "with the writer's most likely reports; \"one report\" marks a figure scored before, with the writer's one "
        "report per image); the true reports reworded (`bench/rephrase_reports.py`: "
        "same sides, count and zones, other words); left and right swapped, and the true reports, on the test "
        "reports a swap changes. A pilot (fewer epochs) is scored with and without the report only.",
        "",
        "| model | recipe | seed | true | no report | self-described | generated | reworded | swapped (changed) "
        "| true (changed) | rewording costs | swap costs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in results:
        costs = (None if e.get("rephrased") is None else e["true"] - e["rephrased"],
                 None if e.get("swapped_changed") is None else e["true_changed"] - e["swapped_changed"])
        cells = [_cell(e.get(c)) + (" (one report)" if c == "generated" and e.get(c) is not None
                                    and not e.get("generated_mixed_reports") else "") for c in COLUMNS]
        lines.append(f"| {e['model']} | {e['recipe']} | {e['seed']} | " + " | ".join(cells) + " | " + " | ".join(
            "n/a" if c is None else f"{c:.3f}" for c in costs) + " |")
    lines += ["", "Reworded training copies: `lvit-rdpw-s0` was trained before they were bounded by the model's 24 "
                  "word pieces (a quarter of them ran past it); every later run's copies fit (docs/REPORT_OPTIONAL.md)."
                  " Self-described and generated: columns added with `lvit-rdw-s0`; earlier runs were not rescored "
                  "(their work folders are gone)."]
    if QATA_JSON.is_file():
        qata = json.loads(QATA_JSON.read_text())
        free = [qata[k]["dice_original"] for k in sorted(qata) if qata[k].get("row") == "lvit-t"]
        if free:
            lines += ["", f"The text-free LViT-T trained the same way (bench/qata_results.json): "
                          f"{', '.join(f'{d:.4f}' for d in free)} (seeds "
                          f"{', '.join(str(qata[k]['seed']) for k in sorted(qata) if qata[k].get('row') == 'lvit-t')})"
                          "; the goals: at least 0.825 with the true report, 0.79 without one, a swap costing at "
                          "least 0.15 on the changed reports, rewording at most 0.01."]
    lines += rule_table(results)
    lines += ["", f"Machine: {'; '.join(machine)}."]
    render_section(SECTION, "\n".join(lines), args.results_md)
    return 0


def rule_table(results: list[dict]) -> list[str]:
    """What each rewording rule alone costs, for the entries scored with ``--by-rule``."""
    scored = [e for e in results if e.get("rephrased_by_rule")]
    if not scored:
        return []
    rules = list(dict.fromkeys(r for e in scored for r in e["rephrased_by_rule"]))
    lines = ["", "What each rewording rule costs alone (`evaluate --by-rule`): every test report reworded by that "
                 "one rule (seed 0), per-image Dice at 224x224 with the true minus with the reworded reports, over "
                 "the images whose report the rule changes (their number in brackets; \"cut\": how many of those "
                 "reworded reports run past the model's word pieces, whose cost is partly words it never reads).", "",
             "| model | " + " | ".join(rules) + " |", "|---|" + "---|" * len(rules)]
    for e in scored:
        by = e["rephrased_by_rule"]
        lines.append(f"| {e['model']} | " + " | ".join(
            f"{by[r]['true'] - by[r]['rephrased']:.3f} ({by[r]['n_changed']:,}"
            + (f"; {by[r]['n_truncated']:,} cut" if by[r].get("n_truncated") else "") + ")" if r in by else "n/a"
            for r in rules) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("evaluate")
    add_data_args(e)
    e.add_argument("--runs", required=True, help="comma-separated run names")
    e.add_argument("--reporter", type=Path, default=None, help="report writer folder (lvit train-reporter --out)")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--pilot", action="store_true",
                   help="score the true and no-report columns only (the others are left n/a)")
    e.add_argument("--by-rule", action="store_true",
                   help="also score the reports reworded by one rule at a time (key rephrased_by_rule)")
    e.set_defaults(func=evaluate)
    f = sub.add_parser("facts", help="add the training facts (metrics.csv) of the runs in WORK to their entries")
    f.add_argument("--work", type=Path, required=True, help="the work folder of bench/qata.py (WORK/runs)")
    f.set_defaults(func=add_facts)
    r = sub.add_parser("render")
    r.set_defaults(func=render)
    for q in (e, r, f):
        add_results_args(q, RESULTS_JSON)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
