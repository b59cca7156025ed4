"""Reworded reports: the same facts as a report in LViT's template, in other words.

    python bench/rephrase_reports.py --data QATA [--split test] [--seed 0] [--show 8]

Each report of the split is rewritten by a seeded choice of the rules below (each applied with probability 1/2,
at least two per report), and every rewritten report is read back by :func:`facts`, a parser of the reworded
language written apart from the rules, which must give the original's sides, count and zones; the script fails
on any report that loses a fact. ``bench/report_optional.py`` scores models on these reports (the "rephrased"
column). The rules are for testing only: no training recipe in lvit uses them (the 0.01 goal measures how far a
model's reading generalises, not a memorised wording).

Rules (``RULES``):
  whole-lung   "upper middle lower left lung" -> "all left lung" or "the entire left lung"
  digits       number words -> digits ("two infected areas" -> "2 infected areas")
  synonyms     "infection" -> "opacity" / "lesions" / "infiltrates"; "infected areas" -> "affected areas" /
               "regions involved"
  zone-words   "<levels> left lung" -> "left <levels> zone(s)" with "mid" for middle ("left mid and lower zones")
  reorder      the location first: "<zones>: bilateral pulmonary opacity, 2 affected areas."
  side-order   the right lung named before the left
  sides-plain  "bilateral" -> "in both lungs", "unilateral" -> "in one lung"
  spelling     "localised to" (British) or "localized to" (American) before the zones
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from lvit.data.describe import LEVELS, NUMBER_WORDS, SIDES, Findings, parse_findings

RULES = ("whole-lung", "digits", "synonyms", "zone-words", "reorder", "side-order", "sides-plain", "spelling")
LEVEL_WORDS = {"upper": "upper", "middle": "mid", "lower": "lower"}


def _side_phrase(levels: list[str], side: str, rules: set[str], rng: np.random.Generator) -> str:
    if "whole-lung" in rules and len(levels) == len(LEVELS):
        return f"all {side} lung" if rng.random() < 0.5 else f"the entire {side} lung"
    if "zone-words" in rules:
        words = [LEVEL_WORDS[lv] for lv in levels]
        joined = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        return f"{side} {joined} zone{'s' if len(words) > 1 else ''}"
    return f"{' '.join(levels)} {side} lung"


def rephrase(text: str, rng: np.random.Generator, only: str | None = None) -> tuple[str, list[str]]:
    """A report in LViT's template -> (the same facts reworded, the rules used). Reports saying no infection
    become "No pulmonary opacity." or stay as they are. ``only``: that one rule and no other (a report it does
    not apply to, such as side-order on one lung, comes back as it was)."""
    if only is not None and only not in RULES:
        raise ValueError(f"unknown rewording rule {only!r} (rules: {', '.join(RULES)})")
    findings = parse_findings(text)
    if findings.count == 0 and not findings.zones:
        if only not in (None, "synonyms"):
            return text, []
        return ("No pulmonary opacity.", ["synonyms"]) if rng.random() < 0.5 else (text, [])
    while only is None:
        rules = {r for r in RULES if rng.random() < 0.5}
        if len(rules) >= 2:
            break
    if only is not None:
        rules = {only}
    per_side = [(side, [lv for lv in LEVELS if (lv, side) in findings.zones]) for side in SIDES]
    per_side = [(side, levels) for side, levels in per_side if levels]
    if "side-order" in rules:
        if len(per_side) == 2:
            per_side.reverse()
        else:
            rules.discard("side-order")
    zones = " and ".join(_side_phrase(levels, side, rules, rng) for side, levels in per_side)
    if "whole-lung" in rules and not any(len(levels) == len(LEVELS) for _, levels in per_side):
        rules.discard("whole-lung")
    kind = "bilateral" if findings.sides == 2 else "unilateral"
    disease = "infection"
    if "synonyms" in rules:
        disease = ("opacity", "lesions", "infiltrates")[int(rng.integers(3))]
    count = str(findings.count) if "digits" in rules else NUMBER_WORDS[findings.count]
    areas = "infected area" + ("s" if findings.count != 1 else "")
    if "synonyms" in rules:
        areas = ("affected area" + ("s" if findings.count != 1 else "")) if rng.random() < 0.5 else \
            ("region involved" if findings.count == 1 else "regions involved")
    head = f"{kind} pulmonary {disease}"
    if "sides-plain" in rules:
        head = f"pulmonary {disease} in {'both lungs' if findings.sides == 2 else 'one lung'}"
    if "spelling" in rules:
        zones = ("localised to " if rng.random() < 0.5 else "localized to ") + zones
    if "reorder" in rules:
        out = f"{zones}: {head}, {count} {areas}."
    else:
        out = f"{head}, {count} {areas}, {zones}."
    if only is not None and not rules:
        return text, []
    return out[0].upper() + out[1:], sorted(rules)


# --- reading a reworded report back: written from the language, not from the rules' code ------------------------

_COUNT = re.compile(r"\b(\d+|" + "|".join(NUMBER_WORDS[1:]) + r") (?:infected|affected) areas?\b|"
                    r"\b(\d+|" + "|".join(NUMBER_WORDS[1:]) + r") regions? involved\b")
_LEVEL = r"(?:upper|middle|mid|lower)"
_TEMPLATE_SIDE = re.compile(rf"\b((?:{_LEVEL} )*{_LEVEL}) (left|right) lung\b")
_WHOLE_SIDE = re.compile(r"\b(?:all|the entire) (left|right) lung\b")
_ZONE_SIDE = re.compile(rf"\b(left|right) ((?:{_LEVEL}(?:, | and | ))*{_LEVEL}) zones?\b")
_LEVEL_OF = {"upper": "upper", "middle": "middle", "mid": "middle", "lower": "lower"}


def _number(word: str) -> int:
    return int(word) if word.isdigit() else NUMBER_WORDS.index(word)


def facts(text: str) -> Findings:
    """Sides, count and zones of a report in LViT's template or in the reworded language; ValueError when the
    report does not state them unambiguously."""
    clean = " ".join(str(text).lower().split()).rstrip(".")
    if re.fullmatch(r"no pulmonary (?:infection|opacity)", clean):
        return Findings(0, 0, frozenset())
    bilateral = bool(re.search(r"\bbilateral\b|\bin both lungs\b", clean))
    unilateral = bool(re.search(r"\bunilateral\b|\bin one lung\b", clean))
    if bilateral == unilateral:
        raise ValueError(f"sides not stated once: {text!r}")
    counts = [m.group(1) or m.group(2) for m in _COUNT.finditer(clean)]
    if len(counts) != 1:
        raise ValueError(f"count not stated once: {text!r}")
    zones: set[tuple[str, str]] = set()
    sides_named: list[str] = []
    for m in _WHOLE_SIDE.finditer(clean):
        sides_named.append(m[1])
        zones.update((lv, m[1]) for lv in LEVELS)
    for m in _TEMPLATE_SIDE.finditer(clean):
        sides_named.append(m[2])
        zones.update((_LEVEL_OF[w], m[2]) for w in m[1].split())
    for m in _ZONE_SIDE.finditer(clean):
        sides_named.append(m[1])
        zones.update((_LEVEL_OF[w], m[1]) for w in re.split(r", | and | ", m[2]))
    if not zones or len(sides_named) != len(set(sides_named)):
        raise ValueError(f"zones not stated once per side: {text!r}")
    return Findings(sides=2 if bilateral else 1, count=_number(counts[0]), zones=frozenset(zones))


def same_facts(original: str, reworded: str) -> bool:
    try:
        return facts(reworded) == parse_findings(original)
    except ValueError:
        return False


def rephrase_all(texts: list[str], seed: int = 0, only: str | None = None) -> tuple[list[str], Counter]:
    """Every report reworded (a generator seeded with ``seed`` per report position; ``only``: by that one rule)
    -> (texts, rule counts). ValueError naming the first report whose reworded text loses a fact."""
    out, used = [], Counter()
    for i, text in enumerate(texts):
        new, rules = rephrase(text, np.random.default_rng([seed, i]), only)
        if not same_facts(text, new):
            raise ValueError(f"report {i}: rewording lost a fact: {text!r} -> {new!r}")
        out.append(new)
        used.update(rules)
    return out, used


def main(argv: list[str] | None = None) -> int:
    from lvit.data import load_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="QaTa-COV19 root (either layout)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=8, help="print this many examples")
    args = parser.parse_args(argv)
    texts = [r.text for r in load_split(args.data, args.split)]
    try:
        reworded, used = rephrase_all(texts, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for original, new in list(zip(texts, reworded))[:args.show]:
        print(f"  {original}\n  -> {new}")
    changed = sum(a != b for a, b in zip(texts, reworded))
    print(f"{len(texts)} reports of {args.split}: {changed} reworded, every one keeps its sides, count and zones; "
          f"{len(set(reworded))} distinct (from {len(set(texts))}); rules used: "
          + ", ".join(f"{r} {used[r]}" for r in RULES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
