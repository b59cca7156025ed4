"""Test-time flip averaging: does averaging a model's answer with its answer on the mirrored image help?

    python bench/flip_average.py --data QATA [--models qata-lvit,W/runs/NAME] [--reports true|none] [--threads 1]

For each model (a shipped name, run or model folder) on the test split: per-image Dice at the masks' original size
of the plain answer and of the mean of the logits of the image and of its mirror image (mirrored back), the mirror
read with the report's left and right swapped (``--reports none``: without a report, for a model with a no-report
path). Both answers come from the same forward passes, so the two figures differ only by the averaging.

lvit's LViT training does not mirror images (a mirror swaps the patient's sides; ``AugmentConfig.hflip_prob`` is
0), so a mirrored chest X-ray (heart on the other side) is new to every model measured here.

Masks are cut at the model's own threshold (``lvit calibrate``; 0.5 where it has none, and for every entry
without a ``threshold`` key: those were measured before models had one).

Raw: bench/flip_average.json (a list: model, reports, n, threshold, dice_original_plain,
dice_original_flip_average, minutes, machine, command).
"""

from __future__ import annotations

import argparse
import sys
import time

from benchkit import REPO, add_data_args, add_model_args, read_raw, write_raw

RESULTS_JSON = REPO / "bench" / "flip_average.json"


def dice(pred, truth) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def score(model: str, data, reports: str, batch: int = 64) -> dict:
    import numpy as np
    import torch

    from lvit.data import load_pair, load_split
    from lvit.inference import Segmenter, to_original_size
    from lvit.text import swap_left_right

    segmenter = Segmenter(model)  # reports it has not cached are encoded, not cached: the data stay untouched
    records = load_split(data, "test")
    plain, averaged = [], []
    started = time.perf_counter()
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        pairs = [load_pair(r, segmenter.in_channels) for r in chunk]
        images = torch.stack([segmenter.preprocess(image) for image, _ in pairs])  # [B, C, S, S]
        texts = None if reports == "none" else [r.text for r in chunk]
        mirrored = None if texts is None else [swap_left_right(t) for t in texts]
        logits = segmenter.logits(images, *segmenter.text_for(texts, len(chunk)))
        logits_mirror = segmenter.logits(images.flip(-1), *segmenter.text_for(mirrored, len(chunk))).flip(-1)
        for k, (image, truth) in enumerate(pairs):
            truth = truth > 0
            size = image.shape[:2]
            plain.append(dice(to_original_size(logits[k:k + 1], size)[0, 0].numpy() >= segmenter.threshold, truth))
            mean = (logits[k:k + 1] + logits_mirror[k:k + 1]) / 2
            averaged.append(dice(to_original_size(mean, size)[0, 0].numpy() >= segmenter.threshold, truth))
        print(f"{model}: {len(plain)}/{len(records)}", flush=True)
    return {"model": str(model), "reports": reports, "n": len(plain), "threshold": segmenter.threshold,
            "dice_original_plain": float(np.mean(plain)), "dice_original_flip_average": float(np.mean(averaged)),
            "minutes": round((time.perf_counter() - started) / 60, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p, work=False)
    add_model_args(p)
    args = p.parse_args(argv)
    import torch

    from lvit.benchmark import machine_line

    torch.set_num_threads(args.threads)
    results = read_raw(RESULTS_JSON, [])
    for model in args.models.split(","):
        entry = score(model, args.data, args.reports)
        entry["machine"] = machine_line()
        entry["command"] = (f"python bench/flip_average.py --data QATA --models {model} --reports {args.reports} "
                            f"--threads {args.threads}")
        results = [e for e in results if (e["model"], e["reports"]) != (model, args.reports)] + [entry]
        write_raw(RESULTS_JSON, results)
        print(f"{model} ({args.reports} reports): plain {entry['dice_original_plain']:.4f}, flip-averaged "
              f"{entry['dice_original_flip_average']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
