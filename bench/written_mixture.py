"""How many written reports to average over: a model that always reads a report, answering without one.

    python bench/written_mixture.py --data QATA --model RUN [--split val] [--ks 1,2,4,8,16] [--limit N]
    python bench/written_mixture.py --render      # the RESULTS.md section from the raw files

A model trained with a report for every image answers an image without one through its report writer. The
writer's one report (its zone scores thresholded) names all six zones right on about a third of the images, and
the model follows the zones it is told. The alternative measured here: the model's answers with the writer's K
most probable reports (zones read as independent probabilities, ``lvit.data.flags.likely_flag_sets``), averaged
with their probabilities as weights. For each K in ``--ks``, on one split, per-image Dice at the masks' original
size, beside the writer's one report and the true report. K is chosen on the validation split; the test figure of
the chosen K comes from ``lvit test MODEL --reports generated`` (the product's own path).

Raw: bench/written_mixture.json (a list, one entry per model and split: model, split, n, dice_original
{"written": ..., "true": ..., "1": ..., "2": ...}, best_k, minutes, machine, command).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchkit import REPO, RESULTS_MD, read_raw, render_section, write_raw

RESULTS_JSON = REPO / "bench" / "written_mixture.json"
SHIPPED_JSON = REPO / "bench" / "shipped_model.json"
SECTION = "written-mixture"


def dice(pred, truth) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def score(prob, image, truth) -> float:
    """Dice at the image's original size of a mean probability map ``[1, S, S]``, turned into logits first as
    lvit's paths do (``Segmenter.logits_over_reports``)."""
    import torch

    from lvit.inference import to_original_size

    logit = torch.logit(prob.clamp(1e-6, 1 - 1e-6)).float()[None]
    return dice(to_original_size(logit, image.shape[:2])[0, 0].numpy() >= 0.5, truth > 0)


def sweep(model: str, data, split: str, ks: list[int], limit: int | None, batch: int = 16) -> dict:
    import numpy as np
    import torch

    from lvit.data import load_pair, load_split
    from lvit.inference import Segmenter

    segmenter = Segmenter(model)
    writer = segmenter.report_writer
    records = load_split(data, split)
    if limit and limit < len(records):  # evenly spread over the split, the same images every time
        records = [records[i] for i in np.linspace(0, len(records) - 1, limit).round().astype(int)]
    k_max = max(ks)
    scores: dict[str, list[float]] = {"written": [], "true": [], **{str(k): [] for k in ks}}
    started = time.perf_counter()
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        pairs = [load_pair(r, segmenter.in_channels) for r in chunk]
        images = torch.stack([segmenter.preprocess(image) for image, _ in pairs])  # [B, C, S, S]
        zone_probs = writer.probabilities([image for image, _ in pairs])  # [B, 6]
        likely, weights = writer.likely_reports(zone_probs, k_max)  # [B][k_max], [B, k_max]
        written = writer.reports_from(zone_probs)
        texts = [t for row in likely for t in row] + written + [r.text for r in chunk]
        rows = torch.tensor([b for b in range(len(chunk)) for _ in range(k_max)] + [*range(len(chunk))] * 2)
        probs = torch.cat([torch.sigmoid(segmenter.logits(images[rows[s:s + 64]],
                                                          *segmenter.text_for(texts[s:s + 64], len(texts[s:s + 64]))))
                           for s in range(0, len(texts), 64)]).double()  # [B * (k_max + 2), 1, S, S]
        mixed = probs[:len(chunk) * k_max].view(len(chunk), k_max, *probs.shape[1:])
        for b, (image, truth) in enumerate(pairs):
            for k in ks:
                w = torch.tensor(weights[b, :k] / weights[b, :k].sum()).view(-1, 1, 1, 1)
                scores[str(k)].append(score((mixed[b, :k] * w).sum(0), image, truth))
            scores["written"].append(score(probs[len(chunk) * k_max + b], image, truth))
            scores["true"].append(score(probs[len(chunk) * (k_max + 1) + b], image, truth))
        print(f"{model} ({split}): {len(scores['true'])}/{len(records)}  "
              + "  ".join(f"{name} {np.mean(v):.4f}" for name, v in scores.items()), flush=True)
    figures = {name: float(np.mean(v)) for name, v in scores.items()}
    best = max(ks, key=lambda k: (round(figures[str(k)], 4), -k))  # ties to the smaller K (fewer forwards)
    return {"model": str(model), "weights_sha256": weights_sha256(model), "split": split, "n": len(records),
            "dice_original": figures, "best_k": best, "minutes": round((time.perf_counter() - started) / 60, 1)}


def weights_sha256(model: str) -> str:
    """The sha256 of the weights file a sweep read: a shipped name or a folder can hold other weights later."""
    import hashlib

    from lvit.artifacts.runs import resolve_run

    _, weights = resolve_run(model)
    return hashlib.sha256(Path(weights).read_bytes()).hexdigest()


def render(results_md: Path = RESULTS_MD) -> Path:
    """The RESULTS.md section: each sweep, and the shipped model's test figures before and after (its JSON)."""
    entries = read_raw(RESULTS_JSON, [])
    lines = ["## Answering without a report through the report writer: one report or the likely ones", "",
             "A model that always reads a report and has no no-report path of its own answers an image without "
             "one through its report writer (the first shipped `qata-lvit`, 10 epochs, did). Each sweep names the "
             "weights it ran on (a sweep without a hash ran before lvit recorded it, on that first `qata-lvit`, "
             "weights sha256 39b3b59e...). Columns: per-image Dice at the masks' original size with the writer's "
             "one report (its zone scores thresholded), with the mean of the model's answers over the writer's K "
             "most probable reports (zones read as independent, weights their probabilities), and with the true "
             "report. K is "
             "chosen on the validation split (`bench/written_mixture.py`; raw `bench/written_mixture.json`).", ""]
    for e in entries:
        ks = sorted((k for k in e["dice_original"] if k.isdigit()), key=int)
        lines += ["| model | split | images | one report | " + " | ".join(f"K = {k}" for k in ks) + " | true report |",
                  "|---|---|---|---|" + "---|" * len(ks) + "---|",
                  f"| {e['model']} ({e['weights_sha256'][:8] if e.get('weights_sha256') else 'no hash'}) | "
                  f"{e['split']} | {e['n']:,} | {e['dice_original']['written']:.4f} | "
                  + " | ".join(f"{e['dice_original'][k]:.4f}" for k in ks) + f" | {e['dice_original']['true']:.4f} |",
                  "", f"Best K: {e['best_k']}" + (f" ({e['n']:,} images of the split, evenly spread)" if "--limit" in
                                                     e["command"] else "")
                  + f". Machine: {e['machine']}; `{e['command']}`; {e['minutes']} min.", ""]
    shipped = read_raw(SHIPPED_JSON, {})
    if "generated_before" in shipped:
        before, after = shipped["generated_before"]["test"], shipped["generated"]
        scoring = shipped.get("generated_scoring", {})
        lines += [f"Test split, {after['n_test']:,} images, the shipped weights (`bench/shipped_model.json`, keys "
                  f"`generated_before` and `generated`): one report {before['dice_original']:.4f}, the mean over "
                  f"the {after['mixed_reports']} most likely {after['dice_original']:.4f} (IoU "
                  f"{before['iou_original']:.4f} -> {after['iou_original']:.4f}; pooled Dice "
                  f"{before['pooled_dice_original']:.4f} -> {after['pooled_dice_original']:.4f}); with the true "
                  f"report {shipped['dice_original']:.4f}. Machine: {scoring.get('machine')}; "
                  f"`{scoring.get('command')}`."]
    elif "generated" in shipped:
        after, own = shipped["generated"], shipped.get("no_report")
        at_half = shipped.get("at_threshold_0_5") or {}
        cut = (shipped.get("threshold") or {}).get("threshold", 0.5)

        def both(now: dict, key: str | None) -> str:  # the figure at the model's threshold, and at 0.5 if it differs
            half = at_half.get(key) if key else at_half
            return f"{now['dice_original']:.4f}" + (f" ({half['dice_original']:.4f} at 0.5)" if half else "")

        lines += [f"Test split, {after['n_test']:,} images, the shipped weights (sha256 "
                  f"{shipped['weights_sha256'][:8]}, `bench/shipped_model.json`, key `generated`), masks cut at the "
                  f"model's threshold {cut:g}: the mean over the writer's {after['mixed_reports']} most likely "
                  f"reports {both(after, 'generated')}; with the true report {both(shipped, None)}"
                  + (f"; through the model's own no-report path (report dropout, the default without a report) "
                     f"{both(own, 'no_report')}" if own else "") + ". Machine: "
                  f"{(shipped.get('reporter') or {}).get('machine')}; `python bench/shipped_model.py add-reporter "
                  "--reporter R --data QATA --sample ... --command ... --commit SHA`, then `... threshold`."]
    elif shipped:
        lines += [f"The shipped weights now (sha256 {shipped['weights_sha256'][:8]}, base width "
                  f"{shipped['base_channels']}, {shipped['image_size']} px) carry no report writer: their folder "
                  "has no room for one under 16 MiB, and without a report they answer through their own no-report "
                  "path. The figures above were measured with the earlier shipped weights named in each entry."]
    return render_section(SECTION, "\n".join(lines).rstrip() + "\n", results_md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="QaTa-COV19 root (either layout); not needed with --render")
    p.add_argument("--model", default=None,
                   help="a run or model folder with a report writer (required unless --render; the shipped "
                        "qata-lvit carries none)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--ks", default="1,2,4,8,16", help="comma-separated numbers of reports to average over")
    p.add_argument("--limit", type=int, default=None, help="only N images of the split, evenly spread")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render", action="store_true", help="only render the RESULTS.md section from the raw files")
    args = p.parse_args(argv)
    if args.render:
        print(f"wrote {render()}")
        return 0
    if args.data is None or args.model is None:
        p.error("--data and --model are required (unless --render)")
    import torch

    from lvit.benchmark import machine_line

    torch.set_num_threads(args.threads)
    ks = sorted({int(k) for k in args.ks.split(",")})
    entry = sweep(args.model, args.data, args.split, ks, args.limit)
    entry["machine"] = machine_line()
    entry["command"] = (f"python bench/written_mixture.py --data QATA --model {args.model} --split {args.split} "
                        f"--ks {args.ks}" + (f" --limit {args.limit}" if args.limit else "")
                        + f" --threads {args.threads}")
    results = [e for e in read_raw(RESULTS_JSON, []) if (e["model"], e["split"]) != (args.model, args.split)]
    write_raw(RESULTS_JSON, results + [entry])
    render()
    print(f"{args.model} ({args.split}, {entry['n']} images): best K {entry['best_k']}; "
          + ", ".join(f"{name} {v:.4f}" for name, v in entry["dice_original"].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
