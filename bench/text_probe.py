"""Does a trained LViT read its reports? Score one run on a split three times: with the true reports, with
"left" and "right" swapped, and with "No pulmonary infection." for every image.

    python bench/text_probe.py RUN_DIR --data ROOT [--split test]

A model that ignores text scores the same three times; one that reads it loses Dice when the report lies.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from lvit.data import load_split, read_image, read_mask
from lvit.metrics import dice_iou
from lvit.evaluate.predict import Predictor
from lvit.text import swap_left_right

NORMAL = "No pulmonary infection."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    predictor = Predictor(args.run)
    variants = {"true report": lambda t: t, "left/right swapped": swap_left_right, "'No pulmonary infection.'": lambda t: NORMAL}
    scores: dict[str, list[float]] = {k: [] for k in variants}
    for record in load_split(args.data, args.split):
        image, truth = read_image(record.image_path), read_mask(record.mask_path).astype(bool)
        for name, change in variants.items():
            prob = predictor.predict(image, change(record.text))
            scores[name].append(dice_iou(prob > 0.5, truth)[0])
    print(f"{args.run} on {args.split} ({len(scores['true report'])} images): Dice at 0.5, mean over images")
    for name, values in scores.items():
        print(f"  {name:28s} {np.mean(values):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
