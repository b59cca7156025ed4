"""Segmentation without a report: a text-guided LViT given the report its report writer generates from the image
alone, against the true report, a no-infection report, and the text-free LViT-T.

    python bench/generated_reports.py evaluate --name qata --data ROOT --text-run RUN --free-run RUN_T \
        --reporter WRITER [--split test] [--cache-dir DIR]
    python bench/generated_reports.py render

``evaluate`` scores one dataset (``--name`` keys it in bench/generated_reports.json) and re-renders the
``generated-reports`` section of bench/RESULTS.md; ``render`` only re-renders. Every figure is Dice/IoU at 0.5 at
the model's resolution, mean over images (the paper's figure), on the whole split. Report sources, each given to
the same LViT weights:

* ``true``: the dataset's report;
* ``generated``: the report writer's (``lvit train-reporter``; thresholds chosen on val);
* ``no_infection``: "No pulmonary infection." for every image;
* ``most_frequent``: the training split's most frequent report, for every image;
* ``described_lvit_t``: ``lvit describe``'s rule applied to LViT-T's predicted mask;
* ``two_pass``: the rule applied to LViT's own mask predicted with the most frequent report;
* ``described_truth``: the rule applied to the ground-truth mask (an oracle: how well LViT works with rule-written
  reports when the mask is right).

Besides Dice, each source's agreement with the true reports (exact report, zone accuracy, macro F1), and the share
of the LViT-T-to-true-report gap the generated report closes: (generated - LViT-T) / (true - LViT-T).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

from benchkit import REPO, RESULTS_MD

RESULTS_JSON = REPO / "bench" / "generated_reports.json"
SECTION = "generated-reports"
SOURCE_LABELS = {
    "true": "true report",
    "generated": "**generated report** (report writer)",
    "no_infection": '"No pulmonary infection."',
    "most_frequent": "training split's most frequent report",
    "described_lvit_t": "rule on LViT-T's mask",
    "two_pass": "rule on LViT's mask (most frequent report first)",
    "described_truth": "rule on the true mask (oracle)",
}


def _progress(label: str):
    from tqdm import tqdm

    bar = {"bar": None}

    def update(done: int, total: int) -> None:
        if bar["bar"] is None:
            bar["bar"] = tqdm(total=total, desc=label, unit="img", file=sys.stderr)
        bar["bar"].n = done
        bar["bar"].refresh()
        if done >= total:
            bar["bar"].close()

    return update


def evaluate(args) -> int:
    import numpy as np
    import torch

    from lvit.artifacts.reporter_folder import read_reporter_meta
    from lvit.benchmark import machine_line
    from lvit.core.io import update_results_file
    from lvit.data import load_split, read_mask
    from lvit.data.describe import format_report, mask_findings, parse_findings
    from lvit.data.flags import report_agreement, same_findings
    from lvit.evaluate.reporter import segment_with_reports, subset_summary
    from lvit.evaluate.text_probe import NO_INFECTION
    from lvit.inference import ReportWriter, write_reports

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    records = load_split(args.data, args.split)
    train_records = load_split(args.data, "train")
    writer = ReportWriter(args.reporter)
    meta = read_reporter_meta(args.reporter)
    cap = writer.capitalize
    style = (lambda f: format_report(f, capitalize=cap))
    true = [r.text for r in records]

    generated, probs = write_reports(writer, records, batch_size=64, progress=_progress("report writer"))
    mode = collections.Counter(parse_findings(r.text) for r in train_records).most_common(1)[0][0]
    most_frequent = [style(mode)] * len(records)
    no_infection = [NO_INFECTION if cap else NO_INFECTION.lower()] * len(records)

    free = segment_with_reports(args.free_run, records, batch_size=32, cache_dir=args.cache_dir, keep_masks=True,
                                progress=_progress("LViT-T"))
    described_t = [style(mask_findings(m)) for m in free["masks"]["image only"]]
    first = segment_with_reports(args.text_run, records, {"most_frequent": most_frequent}, batch_size=32,
                                 cache_dir=args.cache_dir, keep_masks=True, progress=_progress("LViT, first pass"))
    two_pass = [style(mask_findings(m)) for m in first["masks"]["most_frequent"]]
    described_truth = [style(mask_findings(read_mask(r.mask_path))) for r in records]

    sources = {"true": true, "generated": generated, "no_infection": no_infection, "most_frequent": most_frequent,
               "described_lvit_t": described_t, "two_pass": two_pass, "described_truth": described_truth}
    rest = {name: texts for name, texts in sources.items() if name != "most_frequent"}  # scored by the first pass
    scored = segment_with_reports(args.text_run, records, rest, batch_size=32, cache_dir=args.cache_dir,
                                  progress=_progress("LViT, all reports"))
    for part in ("sources", "counts"):
        scored[part]["most_frequent"] = first[part]["most_frequent"]
    free_dice = free["sources"]["image only"]["dice"]
    true_dice = scored["sources"]["true"]["dice"]
    out_sources = {}
    for name, texts in sources.items():
        entry = dict(scored["sources"][name])
        entry["agreement"] = {k: v for k, v in report_agreement(texts, true).items()}
        wrong = np.array([not same_findings(a, b) for a, b in zip(true, texts)])
        if wrong.any() and name != "true":
            entry["changed"] = {**subset_summary(scored["counts"][name], wrong),
                                "true_dice": subset_summary(scored["counts"]["true"], wrong)["dice"],
                                "lvit_t_dice": subset_summary(free["counts"]["image only"], wrong)["dice"]}
        gap = true_dice - free_dice
        entry["gap_closed"] = (entry["dice"] - free_dice) / gap if abs(gap) > 1e-12 else None
        out_sources[name] = entry
    distinct = collections.Counter(generated)
    result = {
        "data": str(Path(args.data).resolve()), "split": args.split, "n_images": len(records),
        "text_run": str(Path(args.text_run).resolve()), "free_run": str(Path(args.free_run).resolve()),
        "reporter": meta["folder"],
        "reporter_info": {k: meta[k] for k in ("model", "thresholds", "allow_empty", "training", "best_epoch",
                                                "data", "seconds") if k in meta},
        "reporter_val": meta["val"]["thresholds_chosen"], "reporter_val_at_0.5": meta["val"]["threshold_0.5"],
        "lvit_t": free["sources"]["image only"],
        "sources": out_sources,
        "generated_distinct_reports": len(distinct),
        "generated_most_common": distinct.most_common(3),
        "goal": {"at_least_lvit_t": out_sources["generated"]["dice"] >= free_dice,
                 "half_gap_closed": (out_sources["generated"]["gap_closed"] or 0) >= 0.5},
        "command": " ".join(["python", "bench/generated_reports.py", *sys.argv[1:]]),
        "setup": list(args.setup),
        "machine": machine_line(),
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    update_results_file(args.results, args.name, result)
    g = out_sources["generated"]
    print(f"{args.name}: LViT-T {free_dice:.4f}; LViT with true {true_dice:.4f}, generated {g['dice']:.4f} "
          f"(gap closed {g['gap_closed'] if g['gap_closed'] is None else round(g['gap_closed'], 3)}), no infection "
          f"{out_sources['no_infection']['dice']:.4f}; generated = true report for "
          f"{g['agreement']['exact']:.3f} of images", flush=True)
    if not args.no_render:
        render(args.results, args.results_md)
    return 0


DATASET_LABELS = {"qata": "QaTa-COV19 (real chest X-rays, preset qata-cpu)",
                  "synth": "synthetic data (lvit synth, preset synth)",
                  "qata-noise50": "QaTa-COV19, LViT fine-tuned 3 epochs with half its training reports given to the "
                                  "report writer (bench/report_noise.py --fraction 0.5)",
                  "qata-noise0": "QaTa-COV19, LViT fine-tuned 3 epochs on the true reports only (the control: "
                                 "bench/report_noise.py --fraction 0)"}
ORDER = ("qata", "qata-noise50", "qata-noise0", "synth")


def _f(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def noise_summary(results: dict) -> list[str]:
    """One paragraph comparing the two fine-tunings of bench/report_noise.py, when both are in the file."""
    if not {"qata-noise50", "qata-noise0"} <= set(results):
        return []
    mixed, control = results["qata-noise50"]["sources"], results["qata-noise0"]["sources"]

    def changed(s: dict) -> str:
        return _f(s["generated"].get("changed", {}).get("dice"))

    return ["", "### Training with generated reports (bench/report_noise.py)", "",
            "The same LViT (seed 0 of section qata) fine-tuned 3 more epochs (lr 3e-4, one cosine cycle) either with "
            "half of its training reports replaced by the writer's (where the writer is wrong, they then differ from "
            "the true ones) or "
            f"on the true reports only (control). Generated-report Dice: {_f(mixed['generated']['dice'])} vs "
            f"{_f(control['generated']['dice'])} (on the images whose generated report is wrong: {changed(mixed)} "
            f"vs {changed(control)}); true-report Dice {_f(mixed['true']['dice'])} vs {_f(control['true']['dice'])}; "
            f"LViT-T {_f(results['qata-noise0']['lvit_t']['dice'])}. One seed each."]


def render(results_path: Path, md_path: Path) -> str:
    from lvit.core.io import read_results_file, write_marked_section

    results = read_results_file(results_path)
    if not results:
        return ""
    lines = [
        "## Segmentation without a report: generated reports",
        "",
        "A text-guided LViT needs a report; `lvit train-reporter` trains a report writer (a ~0.2 M-parameter CNN, "
        "128 px gray, scoring the six lung zones of the template from the image alone; per-zone thresholds chosen "
        "for F1 on the val split; count = zones named) and `lvit predict` / `lvit test --reports generated` give "
        "its report to the model. Test Dice/IoU at 0.5, model resolution, mean over images; the same LViT weights "
        "under every report; \"agrees\" = the report names exactly the true report's zones; gap closed = (Dice - "
        "LViT-T) / (true report - LViT-T).",
    ]
    for name, r in sorted(results.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER)):
        s = r["sources"]
        t_dice = r["lvit_t"]["dice"]
        val = r["reporter_val"]
        lines += [
            "",
            f"### {DATASET_LABELS.get(name, name)}: {r['split']} split, {r['n_images']} images",
            "",
            "| report given to LViT | Dice | IoU | agrees with true report | zone accuracy | gap closed |",
            "|---|---|---|---|---|---|",
        ]
        for key in sorted(s, key=lambda k: list(SOURCE_LABELS).index(k) if k in SOURCE_LABELS else len(SOURCE_LABELS)):
            entry = s[key]
            ag = entry["agreement"]
            lines.append(f"| {SOURCE_LABELS.get(key, key)} | {_f(entry['dice'])} | {_f(entry['iou'])} | "
                         f"{ag['exact']:.3f} | {ag['mean_accuracy']:.3f} | {_f(entry['gap_closed'], 2)} |")
        lines.append(f"| LViT-T (no text) | {_f(t_dice)} | {_f(r['lvit_t']['iou'])} | | | 0 |")
        g = s["generated"]
        goal = r["goal"]
        lines += [
            "",
            f"Goal (generated >= LViT-T and at least half the gap closed): "
            f"{'met' if goal['at_least_lvit_t'] and goal['half_gap_closed'] else 'not met'} "
            f"(generated {_f(g['dice'])} vs LViT-T {_f(t_dice)} and true {_f(s['true']['dice'])}; gap closed "
            f"{_f(g['gap_closed'], 2)}).",
        ]
        if "changed" in g:
            c = g["changed"]
            lines.append(f"On the {c['n']} images whose generated report differs from the true one: Dice "
                         f"{_f(c['dice'])} with it, {_f(c['true_dice'])} with the true report, "
                         f"{_f(c['lvit_t_dice'])} for LViT-T.")
        info = r["reporter_info"]
        tr = info.get("training", {})
        lines += [
            f"Report writer on val ({val['n']} images): exact report {val['exact']:.3f}, zone accuracy "
            f"{val['mean_accuracy']:.3f}, macro F1 {val['macro_f1']:.3f}, count {val['count_accuracy']:.3f}, sides "
            f"{val['sides_accuracy']:.3f} (at 0.5: exact {r['reporter_val_at_0.5']['exact']:.3f}); thresholds "
            + ", ".join(f"{t:.3g}" for t in info.get("thresholds", [])) + f"; {tr.get('epochs')} epochs (best "
            f"{info.get('best_epoch')}), {info.get('seconds', 0) / 60:.1f} min to train. It wrote "
            f"{r['generated_distinct_reports']} distinct reports on {r['split']}.",
            "",
            f"Command: `{r['command']}`; machine: {r['machine']}; {r['minutes']} min.",
        ]
        if r.get("setup"):  # how the data, runs and writer it scores were made
            lines.append("Made with: " + "; ".join(f"`{c}`" for c in r["setup"]) + ".")
    lines += noise_summary(results)
    text = "\n".join(lines)
    write_marked_section(md_path, SECTION, text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("evaluate", help="score one dataset and re-render")
    e.add_argument("--name", required=True, help="key in the results file (qata, synth, ...)")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--text-run", required=True, help="LViT run (reads reports)")
    e.add_argument("--free-run", required=True, help="LViT-T run (no text)")
    e.add_argument("--reporter", required=True, help="report writer folder (or a run folder carrying one)")
    e.add_argument("--cache-dir", default=None, help="text-embedding cache folder (never the dataset's)")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--no-render", action="store_true")
    e.add_argument("--setup", action="append", default=[], metavar="COMMAND",
                   help="how the runs and writer it scores were made (recorded beside the figures; repeatable)")
    for q in (e, sub.add_parser("render", help="re-render the RESULTS.md section from the JSON")):
        q.add_argument("--results", type=Path, default=RESULTS_JSON)
        q.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = p.parse_args(argv)
    if args.cmd == "evaluate":
        return evaluate(args)
    render(args.results, args.results_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
