"""Training-time wording variation: a report in LViT's template, rewritten with the same facts in other words.

A model trained on one template learns its exact words; a report from another hospital (or the reworded test
reports of ``bench/rephrase_reports.py``) then reads as something else. ``text.wording_variants: K`` in a
training config encodes K reworded copies of every training report beside the original, and each time a sample
is drawn it reads one of the K + 1 at random (see :class:`lvit.data.SegmentationDataset`).

The rules here are kept apart from the test rewording of ``bench/rephrase_reports.py``: no rule is shared and no
word that those test rules write appears here (``tests/test_wording.py`` checks both), so a model's score on the
reworded test reports measures how its reading generalises, not a memorised rule.

Rules (``TRAINING_RULES``), each applied with probability 1/2, at least one per variant:
  disease      "infection" -> "pneumonia" / "consolidation" / "disease"
  areas        "infected areas" -> "foci" / "sites" / "patches" (singular "focus" / "site" / "patch")
  levels       "upper" -> "superior" / "apical", "middle" -> "central", "lower" -> "inferior" / "basal"
  lung-word    "lung" -> "lung field" / "hemithorax"
  kind         "bilateral" -> "two-sided", "unilateral" -> "one-sided"
  no-pulmonary "pulmonary" left out
  joiner       the two sides joined by "as well as" or a comma instead of "and"
  preamble     "findings:" / "impression:" / "chest radiograph shows" before the report

Reports that do not follow the template (other datasets, free text) are kept as they are.

Length: several rules lengthen a report, and a model keeps only its first L word pieces. Unbounded, about a
quarter of the reworded QaTa-COV19 copies ran past 24 MiniLM word pieces (a template report has at most 20), so
the second side's zones were cut off in those copies and the lvit-rdpw pilot stopped reading the report's sides
(docs/REPORT_OPTIONAL.md). :func:`wording_variants` therefore takes a ``fits`` check (the training code passes
"at most the model's L word pieces") and draws again until a variant fits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .describe import LEVELS, NUMBER_WORDS, SIDES, format_report, parse_findings

TRAINING_RULES = ("disease", "areas", "levels", "lung-word", "kind", "no-pulmonary", "joiner", "preamble")
DISEASE_WORDS = ("pneumonia", "consolidation", "disease")
AREA_WORDS = (("focus", "foci"), ("site", "sites"), ("patch", "patches"))
LEVEL_WORDS = {"upper": ("superior", "apical"), "middle": ("central",), "lower": ("inferior", "basal")}
LUNG_WORDS = ("lung field", "hemithorax")
KIND_WORDS = {"bilateral": "two-sided", "unilateral": "one-sided"}
JOINERS = (" as well as ", ", ")
PREAMBLES = ("findings: ", "impression: ", "chest radiograph shows ")
#: Every word the rules above can write that the template does not (the disjointness test reads it).
WORDS = frozenset(" ".join((*DISEASE_WORDS, *(w for pair in AREA_WORDS for w in pair),
                            *(w for words in LEVEL_WORDS.values() for w in words), *LUNG_WORDS,
                            *KIND_WORDS.values(), *JOINERS, *PREAMBLES)).replace(":", " ").replace(",", " ").split()
                  ) - {"lung"}


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def vary_wording(text: str, rng: np.random.Generator) -> str:
    """``text`` with the same facts in other words by :data:`TRAINING_RULES` (seeded by ``rng``); a report
    outside the template, or one saying there is no infection, is returned unchanged."""
    try:
        findings = parse_findings(text)
    except ValueError:
        return text
    if not findings.zones or not findings.consistent or format_report(findings) != " ".join(text.lower().split()):
        return text
    while True:
        rules = {r for r in TRAINING_RULES if rng.random() < 0.5}
        if rules:
            break
    lung = _choice(rng, LUNG_WORDS) if "lung-word" in rules else "lung"
    parts = []
    for side in SIDES:
        levels = [lv for lv in LEVELS if (lv, side) in findings.zones]
        if levels:
            words = [_choice(rng, LEVEL_WORDS[lv]) if "levels" in rules else lv for lv in levels]
            parts.append(f"{' '.join(words)} {side} {lung}")
    zones = (_choice(rng, JOINERS) if "joiner" in rules else " and ").join(parts)
    kind = "unilateral" if findings.sides == 1 else "bilateral"
    kind = KIND_WORDS[kind] if "kind" in rules else kind
    disease = _choice(rng, DISEASE_WORDS) if "disease" in rules else "infection"
    head = f"{kind} {disease}" if "no-pulmonary" in rules else f"{kind} pulmonary {disease}"
    n = findings.count
    count = NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)
    if "areas" in rules:
        singular, plural = _choice(rng, AREA_WORDS)
        areas = singular if n == 1 else plural
    else:
        areas = "infected area" if n == 1 else "infected areas"
    report = f"{head}, {count} {areas}, {zones}."
    return _choice(rng, PREAMBLES) + report if "preamble" in rules else report


#: Draws of :func:`vary_wording` per copy before a report that never fits is kept in its own words.
MAX_DRAWS = 32


def wording_variants(texts: list[str], count: int, seed: int = 0,
                     fits: Callable[[str], bool] | None = None) -> list[list[str]]:
    """``count`` reworded copies of ``texts``: a list of ``count`` lists, each as long as ``texts``.

    ``fits(variant)`` (optional) must hold for every copy: a variant that fails it is drawn again, up to
    :data:`MAX_DRAWS` times, then the original text stands in (it is what the model would read anyway)."""
    rng = np.random.default_rng(seed)

    def one(text: str) -> str:
        for _ in range(MAX_DRAWS if fits is not None else 1):
            variant = vary_wording(text, rng)
            if fits is None or fits(variant):
                return variant
        return text

    return [[one(t) for t in texts] for _ in range(count)]
