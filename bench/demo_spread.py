"""`lvit demo` with several training seeds: the spread of its Dice/IoU, text probe and wall time.

    python bench/demo_spread.py --work /tmp/demo-spread [--seeds 666,0,1]

Each seed runs the README's main job exactly (`lvit demo --out WORK/seed-N --set trainer.seed=N`; the synthetic
data is the same for every seed) in its own process, timed wall-clock. Raw results: bench/demo_spread.json;
bench/RESULTS.md section "demo" is rendered from it. Run it on a quiet machine: the times are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchkit import REPO, RESULTS_MD

RESULTS_JSON = REPO / "bench" / "demo_spread.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/lvit-demo-spread"))
    p.add_argument("--seeds", default="666,0,1", help="trainer seeds (666 = the preset's, what `lvit demo` uses)")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--results", type=Path, default=RESULTS_JSON)
    p.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = p.parse_args(argv)
    from lvit.core.io import atomic_write_text, read_results_file

    results = read_results_file(args.results)
    if not args.render_only:
        for seed in [int(s) for s in args.seeds.split(",")]:
            out = args.work / f"seed-{seed}"
            cmd = ["lvit", "demo", "--out", str(out), "--force", "--no-progress", "--set", f"trainer.seed={seed}"]
            print("$ " + " ".join(cmd), flush=True)
            load = os.getloadavg()[0]
            started = time.perf_counter()
            subprocess.run(cmd, check=True)
            seconds = time.perf_counter() - started
            metrics = json.loads((out / "run" / "test-test" / "metrics.json").read_text())
            v = metrics["text_probe"]["variants"]
            results[str(seed)] = {
                "seed": seed, "seconds": round(seconds, 1), "load_before": round(load, 2), "dice": metrics["dice"],
                "iou": metrics["iou"], "swapped_dice": v["swapped"]["dice"],
                "swapped_changed_dice": v["swapped"]["changed"]["dice"], "no_infection_dice": v["no_infection"]["dice"],
                "machine": machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            }
            atomic_write_text(args.results, json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(render(results, args.results_md))
    return 0


def machine() -> str:
    import torch

    from lvit.benchmark import cpu_name

    return f"CPU {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"


def render(results: dict, md: Path) -> str:
    from lvit.core.io import write_marked_section

    rows = sorted(results.values(), key=lambda r: r["seed"])
    if not rows:
        return ""

    def spread(key, fmt="{:.3f}"):
        values = [r[key] for r in rows]
        return f"{fmt.format(sum(values) / len(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    lines = [
        "## `lvit demo`: spread over training seeds",
        "",
        "The README's main job (synthetic data seed 0: 160 train / 32 val / 48 test, preset `synth`, 40 epochs), once "
        "per trainer seed, each in a fresh process; the data are identical, only the training seed differs. Test "
        "Dice/IoU: mean over images at 0.5. Text probe: the same weights with left and right swapped in every "
        "report, and with \"No pulmonary infection.\".",
        "",
        "| trainer seed | test Dice | test IoU | Dice, left/right swapped | Dice, no-infection report | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['dice']:.3f} | {r['iou']:.3f} | {r['swapped_dice']:.3f} | "
                     f"{r['no_infection_dice']:.3f} | {r['seconds'] / 60:.1f} min (load {r['load_before']}, "
                     f"OMP_NUM_THREADS {r.get('omp_num_threads', 'unset')}) |")
    lines += ["", f"Mean (range) over {len(rows)} seeds: Dice {spread('dice')}, IoU {spread('iou')}, swapped "
              f"{spread('swapped_dice')}, no-infection {spread('no_infection_dice')}, wall time "
              f"{spread('seconds', '{:.0f}')} s.", "",
              f"Machine: {rows[0]['machine']}. Command: `python bench/demo_spread.py --seeds "
              f"{','.join(str(r['seed']) for r in rows)}`."]
    section = "\n".join(lines)
    write_marked_section(md, "demo", section)
    return section


if __name__ == "__main__":
    sys.exit(main())
