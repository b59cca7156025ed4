"""How many written reports to average over: a model that always reads a report, answering without one.

    python bench/written_mixture.py --data QATA [--model qata-lvit] [--split val] [--ks 1,2,4,8,16] [--limit N]

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

from benchkit import REPO, add_data_args, read_raw, write_raw

RESULTS_JSON = REPO / "bench" / "written_mixture.json"


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
        written = [writer.reports([image])[0] for image, _ in pairs]
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
    return {"model": str(model), "split": split, "n": len(records), "dice_original": figures, "best_k": best,
            "minutes": round((time.perf_counter() - started) / 60, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p, work=False)
    p.add_argument("--model", default="qata-lvit", help="a shipped name or a run/model folder with a report writer")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--ks", default="1,2,4,8,16", help="comma-separated numbers of reports to average over")
    p.add_argument("--limit", type=int, default=None, help="only N images of the split, evenly spread")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
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
    print(f"{args.model} ({args.split}, {entry['n']} images): best K {entry['best_k']}; "
          + ", ".join(f"{name} {v:.4f}" for name, v in entry["dice_original"].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
