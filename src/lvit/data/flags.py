"""Zone flags of LViT's reports: the six yes/no answers (upper / middle / lower x left / right lung) a report in
LViT's template gives, and how well one set of flags matches another.

* :func:`report_flags`: a report -> its flags; :func:`decode_flags`, :func:`findings_from_probabilities`:
  zone scores -> flags -> findings (always a report of the template: :func:`lvit.data.describe.parse_findings`
  reads every one back);
* :func:`likely_flag_sets`: the most probable sets of flags and their weights, for averaging over guesses;
* :func:`choose_thresholds`: per-zone thresholds on a validation split (F1 or accuracy);
* :func:`flag_metrics`, :func:`report_agreement`: per-zone accuracy / precision / recall / F1, exact report
  match, count and side accuracy;
* :func:`possible_reports`: every report flags can decode to;
* :data:`FLIPPED_ZONES`: the flags of a horizontally flipped image.

Pure NumPy; the report writer's training (:mod:`lvit.train.reporter`) and use (:mod:`lvit.evaluate.reporter`)
both build on it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from .describe import SIDES, ZONES, Findings, format_report, parse_findings

ZONE_NAMES = tuple(f"{level} {side}" for level, side in ZONES)
# Index of the same zone on the other side: the flags of a horizontally flipped image.
FLIPPED_ZONES = tuple(ZONES.index((level, SIDES[1 - SIDES.index(side)])) for level, side in ZONES)
THRESHOLD_GRID = tuple(np.round(np.arange(0.05, 0.951, 0.025), 3))
OBJECTIVES = ("f1", "accuracy")


def report_flags(text: str) -> np.ndarray:
    """The six zone flags (``ZONES`` order, bool) a report in LViT's template names. ValueError otherwise."""
    return np.array(parse_findings(text).flags, dtype=bool)


def decode_flags(probs: np.ndarray, thresholds: Sequence[float], allow_empty: bool = True) -> np.ndarray:
    """Scores ``[N, 6]`` -> flags ``[N, 6]`` bool: a zone is named when its score reaches its threshold. Without
    ``allow_empty`` an image with no zone over its threshold names its highest-scoring zone."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(ZONES):
        raise ValueError(f"expected scores [N, {len(ZONES)}], got shape {probs.shape}")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (len(ZONES),):
        raise ValueError(f"expected {len(ZONES)} thresholds, got {thresholds.shape}")
    flags = probs >= thresholds
    if not allow_empty and len(probs):
        empty = ~flags.any(axis=1)
        flags[np.flatnonzero(empty), probs[empty].argmax(axis=1)] = True
    return flags


def likely_flag_sets(probs: np.ndarray, k: int, allow_empty: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable sets of flags for each image when the six zone scores ``probs [N, 6]`` are read as
    independent probabilities (the empty set only with ``allow_empty``): ``(flags [N, k, 6] bool, weights
    [N, k])``, most probable first, the weights normalised over the ``k`` sets kept. Where one guess at the
    report is often wrong, averaging a model's answers over these sets is what the guesses are worth together."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(ZONES):
        raise ValueError(f"expected scores [N, {len(ZONES)}], got shape {probs.shape}")
    sets = np.array([f for f in itertools.product((0, 1), repeat=len(ZONES)) if any(f) or allow_empty], dtype=bool)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(sets):
        raise ValueError(f"k must be an integer from 1 to {len(sets)}, got {k!r}")
    p = np.clip(probs, 1e-6, 1 - 1e-6)
    log_prob = np.log(p) @ sets.T + np.log1p(-p) @ (~sets).T  # [N, n_sets]
    top = np.argsort(-log_prob, axis=1, kind="stable")[:, :k]  # [N, k]
    kept = np.take_along_axis(log_prob, top, axis=1)
    weights = np.exp(kept - kept[:, :1])
    return sets[top], weights / weights.sum(axis=1, keepdims=True)


def findings_from_probabilities(probs: np.ndarray, thresholds: Sequence[float],
                                allow_empty: bool = True) -> list[Findings]:
    """:func:`decode_flags`, then one consistent :class:`Findings` per image."""
    return [Findings.from_flags(row) for row in decode_flags(probs, thresholds, allow_empty)]


def possible_reports(allow_empty: bool = True, capitalize: bool = False) -> list[str]:
    """Every report flags can decode to: one per set of named zones, in flag order (the empty set, "no
    pulmonary infection.", only with ``allow_empty``). What a report writer can write, so a model folder can ship
    all of them already encoded."""
    sets = itertools.product((0, 1), repeat=len(ZONES))
    return [format_report(Findings.from_flags(flags), capitalize=capitalize)
            for flags in sets if any(flags) or allow_empty]


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def choose_thresholds(probs: np.ndarray, truth: np.ndarray, objective: str = "f1",
                      grid: Sequence[float] = THRESHOLD_GRID) -> np.ndarray:
    """Per zone, the threshold of ``grid`` that maximises ``objective`` ("f1" or "accuracy") of that zone's flag
    on a validation split (scores ``probs [N, 6]``, true flags ``truth [N, 6]``); ties go to the threshold
    nearest 0.5. A zone never named in ``truth`` keeps 0.5 under "f1" (its F1 is undefined)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown threshold objective {objective!r} (known: {', '.join(OBJECTIVES)})")
    probs, truth = np.asarray(probs, dtype=np.float64), np.asarray(truth, dtype=bool)
    if probs.shape != truth.shape or probs.ndim != 2:
        raise ValueError(f"scores {probs.shape} and flags {truth.shape} must both be [N, {len(ZONES)}]")
    grid = np.asarray(sorted(grid), dtype=np.float64)
    out = np.full(probs.shape[1], 0.5)
    for z in range(probs.shape[1]):
        if len(probs) == 0 or (objective == "f1" and not truth[:, z].any()):
            continue
        pred = probs[:, z][None, :] >= grid[:, None]  # [G, N]
        t = truth[:, z][None, :]
        tp = (pred & t).sum(1)
        fp = (pred & ~t).sum(1)
        fn = (~pred & t).sum(1)
        if objective == "f1":
            score = np.where(tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)
        else:
            score = (pred == t).mean(1)
        best = np.flatnonzero(np.isclose(score, score.max()))
        out[z] = grid[best[np.argmin(np.abs(grid[best] - 0.5))]]
    return out


def flag_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    """How well flags ``pred [N, 6]`` match ``truth [N, 6]`` (bool): per zone accuracy / precision / recall / F1
    and the number of true positives; ``exact`` (all six flags right = the same report), ``mean_accuracy``,
    ``macro_f1``, ``count_accuracy`` (number of zones) and ``sides_accuracy`` (unilateral / bilateral / none)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or pred.ndim != 2 or pred.shape[1] != len(ZONES):
        raise ValueError(f"flags {pred.shape} and {truth.shape} must both be [N, {len(ZONES)}]")
    n = len(pred)
    zones = {}
    for z, name in enumerate(ZONE_NAMES):
        p, t = pred[:, z], truth[:, z]
        tp, fp, fn = float((p & t).sum()), float((p & ~t).sum()), float((~p & t).sum())
        zones[name] = {
            "accuracy": float((p == t).mean()) if n else float("nan"),
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "f1": _f1(tp, fp, fn),
            "positives": int(t.sum()),
        }

    def sides(flags: np.ndarray) -> np.ndarray:
        return flags[:, :3].any(1).astype(int) + flags[:, 3:].any(1).astype(int)

    return {
        "n": n,
        "exact": float((pred == truth).all(1).mean()) if n else float("nan"),
        "mean_accuracy": float(np.mean([v["accuracy"] for v in zones.values()])),
        "macro_f1": float(np.mean([v["f1"] for v in zones.values()])),
        "count_accuracy": float((pred.sum(1) == truth.sum(1)).mean()) if n else float("nan"),
        "sides_accuracy": float((sides(pred) == sides(truth)).mean()) if n else float("nan"),
        "zones": zones,
    }


def report_agreement(reports: Sequence[str], true_reports: Sequence[str]) -> dict:
    """:func:`flag_metrics` of two lists of reports in the template (e.g. generated vs the dataset's)."""
    return flag_metrics(np.stack([report_flags(t) for t in reports]), np.stack([report_flags(t) for t in true_reports]))


def same_findings(a: str, b: str) -> bool:
    """Whether two reports say the same: equal findings when both follow the template, else equal text (case
    and spacing aside)."""
    try:
        return parse_findings(a) == parse_findings(b)
    except ValueError:
        return " ".join(str(a).lower().split()) == " ".join(str(b).lower().split())


__all__ = [
    "FLIPPED_ZONES",
    "OBJECTIVES",
    "THRESHOLD_GRID",
    "ZONE_NAMES",
    "choose_thresholds",
    "decode_flags",
    "likely_flag_sets",
    "findings_from_probabilities",
    "flag_metrics",
    "report_agreement",
    "report_flags",
    "same_findings",
]
