"""A reworded report read as the most similar training report: how often that keeps its facts.

    python bench/nearest_report.py --data QATA [--split test] [--seed 0]

A way to meet the rewording goal of issue "One model, with or without a report" without any wording rule: before
the model reads a report, replace it by the training report whose MiniLM sentence vector (the mean of its word
pieces' vectors without [CLS] and [SEP], unit length; this script's pooling, close to but not exactly
sentence-transformers' own) is closest by cosine, so the model only ever reads the wordings it was trained on.
It can only work if sentence similarity keeps what the model needs, the sides, the count and the zones. This
script measures that before anything is built: it rewords the split's reports with bench/rephrase_reports.py
(all rules together, then each rule alone), finds each reworded report's nearest training report, and counts the
images whose nearest report states the same facts (sides, count and zones alike, and each of the three apart;
in LViT's template the zones fix the sides and the count, so "facts kept" equals "zones kept").
No segmentation model runs. The original reports are scored too: nearly all of them are training reports, so
their nearest report should state their facts (a check that the search works).

Raw: ``bench/nearest_report.json``; section ``nearest-report`` of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from benchkit import add_data_args, add_results_args, bench_module, render_section, write_raw

RESULTS_JSON = Path(__file__).resolve().parent / "nearest_report.json"
FACTS = ("sides", "count", "zones")


def sentence_vectors(encoder, texts: list[str]):
    """[N, D] unit vectors: the mean of each text's word-piece vectors."""
    import torch

    vectors, mask = encoder.encode(texts)
    weights = mask.float().unsqueeze(-1)
    mean = (vectors * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(mean, dim=-1)


def nearest(queries, keys) -> np.ndarray:
    """For each row of ``queries`` the index of the most similar row of ``keys`` (cosine; both unit length)."""
    return (queries @ keys.T).argmax(dim=1).numpy()


def agreement(pairs: list[tuple[str, str]], templates: list[str], picks: dict[str, int]) -> dict:
    """``pairs``: (the report read, the original report) per image; ``picks``: report read -> index of its nearest
    training report. The share of the images whose nearest training report states the original's facts (all three,
    and each apart)."""
    from lvit.data.describe import parse_findings

    kept = dict.fromkeys(("all", *FACTS), 0)
    for read, original in pairs:
        truth, found = parse_findings(original), parse_findings(templates[picks[read]])
        same = [getattr(truth, f) == getattr(found, f) for f in FACTS]
        kept["all"] += all(same)
        for fact, ok in zip(FACTS, same):
            kept[fact] += ok
    return {"images": len(pairs), **{f"{k}_kept": v / len(pairs) for k, v in kept.items()}}


def measure(data: Path, split: str, seed: int) -> dict:
    import torch

    from lvit.data import load_split
    from lvit.text import get_text_encoder

    rephrase = bench_module("rephrase_reports")
    torch.set_num_threads(1)
    # every report whole (none cut at the model's 24 word pieces), and no filler words added to short ones
    encoder = get_text_encoder("minilm", max_tokens=64, min_words=0)
    templates = sorted({r.text for r in load_split(data, "train")})
    originals = [r.text for r in load_split(data, split)]
    keys = sentence_vectors(encoder, templates)
    known = set(templates)
    out = {"split": split, "seed": seed, "training_reports": len(templates), "encoder": encoder.spec,
           "reports_in_training": sum(t in known for t in originals) / len(originals), "rules": {}}
    for rule in ("original", "all", *rephrase.RULES):
        if rule == "original":
            pairs = list(zip(originals, originals))
        else:
            reworded, _ = rephrase.rephrase_all(originals, seed, None if rule == "all" else rule)
            pairs = [(new, old) for new, old in zip(reworded, originals) if new != old]
        if not pairs:  # the rule changes no report of the split (side-order where every report names one lung)
            out["rules"][rule] = {"images": 0}
            continue
        distinct = sorted({read for read, _ in pairs})
        picks = dict(zip(distinct, nearest(sentence_vectors(encoder, distinct), keys).tolist()))
        out["rules"][rule] = agreement(pairs, templates, picks)
    return out


def render(entry: dict, md: Path) -> str:
    lines = ["## A reworded report read as the most similar training report", "",
             f"Each reworded {entry['split']} report (bench/rephrase_reports.py, seed {entry['seed']}) replaced by the "
             f"most similar of the {entry['training_reports']} training reports (cosine of MiniLM sentence vectors, "
             "the mean of the word-piece vectors), and the share of the images whose replacement states the "
             "original's facts: all three, then the sides (one or both lungs), the count of areas and the zones "
             "apart (in LViT's template the zones fix the sides and the count, so \"facts kept\" equals "
             "\"zones kept\"). "
             "Images whose report the rule leaves as it was are not counted. No segmentation model runs "
             "(bench/nearest_report.py).", "",
             "| rewording | images | facts kept | sides kept | count kept | zones kept |",
             "|---|---|---|---|---|---|"]
    for rule in ("original", "all", *bench_module("rephrase_reports").RULES):
        r = entry["rules"].get(rule)
        if r is None:
            continue
        name = {"original": "none (the original reports)", "all": "all rules together (the \"reworded\" column)"}
        kept = [f"{r[k]:.3f}" if k in r else "n/a" for k in ("all_kept", "sides_kept", "count_kept", "zones_kept")]
        lines.append(f"| {name.get(rule, rule)} | {r['images']} | " + " | ".join(kept) + " |")
    lines += ["", f"Command: `{entry['command']}` ({entry['seconds']:.0f} s on {entry['machine']})."]
    body = "\n".join(lines)
    render_section("nearest-report", body, md)
    return body


def main(argv: list[str] | None = None) -> int:
    from lvit.benchmark import machine_line

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(parser, work=False)
    add_results_args(parser, RESULTS_JSON)
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    entry = measure(args.data, args.split, args.seed)
    entry["seconds"] = time.perf_counter() - started
    entry["machine"] = machine_line()
    entry["command"] = ("python bench/nearest_report.py --data QATA"
                        + (f" --split {args.split}" if args.split != "test" else "")
                        + (f" --seed {args.seed}" if args.seed else ""))
    for rule, r in entry["rules"].items():
        if not r["images"]:
            print(f"{rule:12s} changes no report", flush=True)
            continue
        print(f"{rule:12s} {r['images']:5d} images: facts kept {r['all_kept']:.3f} (sides {r['sides_kept']:.3f}, "
              f"count {r['count_kept']:.3f}, zones {r['zones_kept']:.3f})", flush=True)
    write_raw(args.results, entry)
    render(entry, args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
