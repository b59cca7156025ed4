"""Does a trained model read its reports? Score the same weights on a split with changed reports.

Variants (each image keeps its own image and mask; only the report changes):

* ``true``: the dataset's report;
* ``swapped``: "left" and "right" exchanged (:func:`lvit.text.swap_left_right`);
* ``shuffled``: another image's report (a seeded cyclic shift over a random order, so no image keeps its own
  position; it may still draw an identical report, which the ``changed`` figures leave out);
* ``no_infection``: "No pulmonary infection." for every image.

A model that ignores text scores the same under every variant. Many reports are unchanged by a variant (a
bilateral report naming the same zones on both sides says the same after a swap), so each variant also reports
``changed``: the images whose report the variant changes in meaning (:func:`meaning_changed`), with the
true-report Dice on the same images beside it. Figures: Dice/IoU at 0.5 at the model's resolution,
mean over images (the paper's figure) and pooled.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..core.metrics import batch_counts, dice_iou_from_counts
from ..text import swap_left_right

NO_INFECTION = "No pulmonary infection."
VARIANTS = ("true", "swapped", "shuffled", "no_infection")
THRESHOLD = 0.5


def variant_reports(texts: list[str], variant: str, seed: int = 0) -> list[str]:
    """The reports of ``variant`` for images whose true reports are ``texts``."""
    if variant == "true":
        return list(texts)
    if variant == "swapped":
        return [swap_left_right(t) for t in texts]
    if variant == "no_infection":
        return [NO_INFECTION] * len(texts)
    if variant == "shuffled":
        order = np.random.default_rng(seed).permutation(len(texts))
        out = [""] * len(texts)
        for k, i in enumerate(order):
            out[i] = texts[order[(k + 1) % len(texts)]]
        return out
    raise ValueError(f"unknown report variant {variant!r} (known: {', '.join(VARIANTS)})")


def meaning_changed(variant: str, true: str, changed: str) -> bool:
    """Whether ``variant`` turned the report ``true`` into one that says something else. A left/right swap of a
    report naming the same zones on both sides only reorders it ("lower left lung and lower right lung"): the
    zones it names are compared, not the words."""
    from ..data.synthetic import parse_report

    a, b = " ".join(true.lower().split()), " ".join(changed.lower().split())
    if variant == "swapped":
        zones_a, zones_b = parse_report(a), parse_report(b)
        if zones_a or zones_b:
            return zones_a != zones_b
    return a != b


def _summary(counts: torch.Tensor, rows: np.ndarray) -> dict:
    """Per-image mean and pooled Dice/IoU of the images ``rows`` (bool index) from per-image counts [N, 3]."""
    c = counts[torch.from_numpy(rows)]
    per_image = [dice_iou_from_counts(*row.tolist()) for row in c]
    dice = float(np.mean([d for d, _ in per_image])) if per_image else float("nan")
    iou = float(np.mean([j for _, j in per_image])) if per_image else float("nan")
    pooled = dice_iou_from_counts(*c.sum(0).tolist()) if per_image else (float("nan"), float("nan"))
    return {"n": int(rows.sum()), "dice": dice, "iou": iou, "pooled_dice": pooled[0], "pooled_iou": pooled[1]}


@torch.no_grad()
def probe_reports(
    run: str | Path,
    data_root: str | Path,
    split: str = "test",
    *,
    variants: tuple[str, ...] = VARIANTS,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: Callable | None = None,
) -> dict:
    """Scores of the run's weights on ``split`` under each report variant (see the module docstring).

    Returns ``{"split", "n_images", "variants": {name: {n, dice, iou, pooled_dice, pooled_iou, changed:
    {n, dice, iou, pooled_dice, pooled_iou, true_dice, true_iou}}}}``; ``changed`` is absent for ``true``.
    ``progress(done, total)`` is called after each batch. A model without text raises ConfigError.
    """
    from ..core.errors import ConfigError
    from ..data import SegmentationDataset, load_split
    from ..inference import Segmenter
    from ..text import default_cache_dir

    segmenter = Segmenter(run, device=device,
                          cache_dir=cache_dir if cache_dir is not None else default_cache_dir(data_root))
    if not segmenter.uses_text:
        raise ConfigError(f"{run}: this model does not read reports; there is nothing to probe")
    records = load_split(data_root, split)
    texts = [r.text for r in records]
    reports = {v: variant_reports(texts, v, seed) for v in variants}
    encoded = {v: segmenter.text_for(reports[v], len(records)) for v in variants}
    dataset = SegmentationDataset(records, segmenter.image_size, in_channels=segmenter.in_channels)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    counts = {v: torch.zeros(len(records), 3, dtype=torch.float64) for v in variants}
    done = 0
    for batch in loader:
        idx = batch["index"]
        target = batch["mask"] > 0.5
        for v in variants:
            emb, mask = encoded[v]
            logits = segmenter.logits(batch["image"], emb[idx], mask[idx]).cpu()
            counts[v][idx] = batch_counts(torch.sigmoid(logits) >= THRESHOLD, target)
        done += len(idx)
        if progress is not None:
            progress(done, len(records))
    everyone = np.ones(len(records), bool)
    out = {"split": split, "n_images": len(records), "threshold": THRESHOLD, "variants": {}}
    for v in variants:
        entry = _summary(counts[v], everyone)
        if v != "true":
            changed = np.array([meaning_changed(v, a, b) for a, b in zip(texts, reports[v])])
            sub = _summary(counts[v], changed)
            if "true" in counts:
                truth = _summary(counts["true"], changed)
                sub.update(true_dice=truth["dice"], true_iou=truth["iou"])
            entry["changed"] = sub
        out["variants"][v] = entry
    return out


def format_probe(result: dict) -> str:
    """A few lines for a terminal: each variant's Dice, and on the images it changes."""
    lines = [f"text probe on {result['split']} ({result['n_images']} images; Dice at {result['threshold']}, "
             "mean over images):"]
    for v, r in result["variants"].items():
        line = f"  {v:13s} Dice {r['dice']:.4f}"
        ch = r.get("changed")
        if ch is not None and ch["n"]:
            line += (f"   on the {ch['n']} report(s) it changes: {ch['dice']:.4f} "
                     f"(true report {ch.get('true_dice', float('nan')):.4f})")
        lines.append(line)
    return "\n".join(lines)


__all__ = ["NO_INFECTION", "VARIANTS", "format_probe", "probe_reports", "variant_reports"]
