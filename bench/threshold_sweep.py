"""Does another mask threshold than 0.5 pay? Chosen on the validation split, scored once on the test split.

    python bench/threshold_sweep.py --data QATA [--models qata-lvit,W/runs/NAME] [--reports true|none] [--threads 1]
    python bench/threshold_sweep.py --data QATA --render      # only the RESULTS.md section, from the raw file

For each model (a shipped name, run or model folder): per-image Dice at the masks' original size on the val and
the test split at every candidate threshold of :mod:`lvit.evaluate.threshold` (``lvit calibrate``'s sweep: one
forward pass per image, the probability map resized to the mask's size once, then cut at each value). The
threshold with the best validation Dice is what ``lvit calibrate`` keeps; its test figure is the honest one (the
test split never picks it). The official test code cuts at 0.5.

Raw: bench/threshold_sweep.json (a list: model, reports, thresholds, val_dice, test_dice (per-image Dice at each
threshold), chosen (best on val), test_dice_at_0_5, test_dice_at_chosen, weights_sha256 (a shipped name stands for
different weights over time), minutes, machine, command).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from benchkit import REPO, add_data_args, add_model_args, read_raw, render_section, write_raw

RESULTS_JSON = REPO / "bench" / "threshold_sweep.json"


def _shown(model: str) -> str:
    """A run folder under WORK/runs as ``W/runs/NAME`` (no local paths in the raw file); names as given."""
    path = Path(model)
    return f"W/runs/{path.name}" if path.parent.name == "runs" else model


def _progress(split: str):
    def report(done: int, total: int) -> None:
        if done == total or done % 512 < 32:
            print(f"  {split}: {done}/{total}", flush=True)
    return report


def render(results: list[dict]) -> str:
    """The RESULTS.md section ``threshold-sweep`` from the raw entries."""
    lines = ["## The mask threshold chosen on validation images (`lvit calibrate`)", "",
             "Per-image Dice at the masks' original size; the threshold with the best validation Dice among "
             "0.30-0.70 is chosen, then the test split is scored once at it and at 0.5 (the official test code's). "
             "Raw: `bench/threshold_sweep.json` (`bench/threshold_sweep.py`).", "",
             "| model | weights (sha256) | reports | chosen | val Dice at 0.5 -> chosen | test Dice at 0.5 -> chosen "
             "| test gain |",
             "|---|---|---|---|---|---|---|"]
    for e in results:
        at = e["thresholds"].index(0.5)
        weights = e["weights_sha256"][:8] if "weights_sha256" in e else "not recorded"
        lines.append(f"| {e['model']} | {weights} | {e['reports']} | {e['chosen']:g} | {e['val_dice'][at]:.4f} -> "
                     f"{max(e['val_dice']):.4f} | {e['test_dice_at_0_5']:.4f} -> {e['test_dice_at_chosen']:.4f} | "
                     f"{e['test_dice_at_chosen'] - e['test_dice_at_0_5']:+.4f} |")
    lines += ["", "Commands and machines: " + "; ".join(f"`{e['command']}` ({e['machine']}, {e['minutes']} min)"
                                                       for e in results) + "."]
    body = "\n".join(lines)
    render_section("threshold-sweep", body)
    return body


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p, work=False)
    add_model_args(p)
    p.add_argument("--render", action="store_true", help="only render the RESULTS.md section from the raw file")
    args = p.parse_args(argv)
    if args.render:
        render(read_raw(RESULTS_JSON, []))
        return 0
    import torch

    from lvit.benchmark import machine_line
    from lvit.data import load_split
    from lvit.evaluate.threshold import CANDIDATES, choose, sweep
    from lvit.inference import Segmenter

    torch.set_num_threads(args.threads)
    results = read_raw(RESULTS_JSON, [])
    for model in args.models.split(","):
        started = time.perf_counter()
        segmenter = Segmenter(model)
        val_dice, test_dice = (sweep(segmenter, [r for r in load_split(args.data, split) if r.mask_path is not None],
                                     args.reports, progress=_progress(split)) for split in ("val", "test"))
        chosen = choose(val_dice)
        entry = {"model": _shown(model), "reports": args.reports, "thresholds": list(CANDIDATES),
                 "val_dice": val_dice, "test_dice": test_dice, "chosen": chosen,
                 "test_dice_at_0_5": test_dice[CANDIDATES.index(0.5)],
                 "test_dice_at_chosen": test_dice[CANDIDATES.index(chosen)],
                 "weights_sha256": hashlib.sha256(Path(segmenter.weights).read_bytes()).hexdigest(),
                 "minutes": round((time.perf_counter() - started) / 60, 1), "machine": machine_line(),
                 "command": (f"python bench/threshold_sweep.py --data QATA --models {_shown(model)} --reports "
                             f"{args.reports} --threads {args.threads}")}
        # A shipped name stands for other weights after the next ship: an entry of earlier weights stays.
        same = (entry["model"], args.reports, entry["weights_sha256"])
        results = [e for e in results if (e["model"], e["reports"], e.get("weights_sha256")) != same] + [entry]
        write_raw(RESULTS_JSON, results)
        print(f"{model} ({args.reports} reports): threshold {chosen} chosen on val "
              f"({max(val_dice):.4f} vs {val_dice[CANDIDATES.index(0.5)]:.4f} at 0.5); test "
              f"{entry['test_dice_at_chosen']:.4f} vs {entry['test_dice_at_0_5']:.4f} at 0.5", flush=True)
    render(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
