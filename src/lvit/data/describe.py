"""Reports from masks: LViT's structured chest X-ray report, written from a lesion mask, and parsed back.

The template (QaTa-COV19 as LViT ships it; ``lvit synth`` writes the same sentences, capitalised)::

    bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.
    unilateral pulmonary infection, three infected areas, upper middle lower right lung.
    no pulmonary infection.

Three fields: the number of sides (unilateral = 1, bilateral = 2), the number of infected areas, and which of
the six zones (upper / middle / lower x left / right lung) hold lesions. "Left" is the IMAGE's left, as in
LViT's reports. In all 9,258 reports of QaTa-COV19 the number of areas equals the number of zones named and
the side word equals the number of lungs named; :class:`Findings` keeps the three fields apart all the same, so
that a report that breaks the pattern can be parsed and compared field by field.

The rule that writes a report from a mask (:func:`mask_findings`, calibrated on the QaTa-COV19 train split; the
agreement with the real reports is in bench/RESULTS.md, section "describe"):

* side: a pixel is in the left lung when its column lies in the image's left half;
* zones: rows are cut at :data:`UPPER_END` and :data:`MIDDLE_END` of the image height (upper: above 32 %,
  middle: 32-36 %, lower: below 36 %); a zone is named when at least :data:`MIN_ZONE_FRACTION` of the image's
  pixels (0.4 %, 201 px at 224 x 224) of the mask lie in it on that side. The middle band is narrow on purpose:
  QaTa's annotators name the middle zone when a lesion reaches up across about a third of the image height,
  and call most lesions below that "lower" (see docs/DATA.md);
* a non-empty mask with no zone over the threshold names the one zone holding most of its pixels;
* the number of infected areas is the number of zones named (QaTa's convention; connected components agree
  with the real counts far less often);
* an empty mask is "no pulmonary infection."
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .readers import binarise_mask, read_mask

SIDES = ("left", "right")  # image-left, image-right
LEVELS = ("upper", "middle", "lower")
# The order of QaTa-COV19's six zone flags (annotation.json "pseudo_label"), checked against every caption:
# upper/middle/lower left, then upper/middle/lower right.
ZONES = tuple((level, side) for side in SIDES for level in LEVELS)
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NO_INFECTION = "no pulmonary infection."

UPPER_END = 0.32  # fraction of the image height where the upper zone ends
MIDDLE_END = 0.36  # ... and the middle zone ends (the lower zone is the rest)
MIN_ZONE_FRACTION = 0.004  # pixels a zone needs, as a fraction of the image's pixels


@dataclass(frozen=True)
class Rule:
    """The parameters of the mask -> report rule (defaults: the calibrated values)."""

    upper_end: float = UPPER_END
    middle_end: float = MIDDLE_END
    min_zone_fraction: float = MIN_ZONE_FRACTION

    def __post_init__(self):
        if not 0.0 <= self.upper_end <= self.middle_end <= 1.0:
            raise ValueError(f"need 0 <= upper_end <= middle_end <= 1, got {self.upper_end}, {self.middle_end}")
        if not 0.0 <= self.min_zone_fraction < 1.0:
            raise ValueError(f"min_zone_fraction must be in [0, 1), got {self.min_zone_fraction}")


DEFAULT_RULE = Rule()


@dataclass(frozen=True)
class Findings:
    """The structured form of a report: ``sides`` (0 none, 1 unilateral, 2 bilateral), ``count`` (infected
    areas) and ``zones`` ((level, side) pairs). A report written by lvit always has ``consistent`` findings."""

    sides: int
    count: int
    zones: frozenset = field(default_factory=frozenset)

    @classmethod
    def from_zones(cls, zones) -> Findings:
        """Findings that name ``zones``: count = number of zones, sides = number of lungs involved."""
        zones = frozenset((str(level), str(side)) for level, side in zones)
        unknown = sorted(z for z in zones if z not in ZONES)
        if unknown:
            raise ValueError(f"unknown zone(s) {unknown}; zones are (level, side) with level in {LEVELS}, "
                             f"side in {SIDES}")
        return cls(sides=len({side for _, side in zones}), count=len(zones), zones=zones)

    @classmethod
    def from_flags(cls, flags) -> Findings:
        """From six 0/1 flags in QaTa's ``pseudo_label`` order (:data:`ZONES`)."""
        flags = list(flags)
        if len(flags) != len(ZONES):
            raise ValueError(f"expected {len(ZONES)} zone flags, got {len(flags)}")
        return cls.from_zones(z for z, f in zip(ZONES, flags) if f)

    @property
    def flags(self) -> tuple[int, ...]:
        """Six 0/1 flags in QaTa's ``pseudo_label`` order (:data:`ZONES`)."""
        return tuple(int(z in self.zones) for z in ZONES)

    @property
    def consistent(self) -> bool:
        """True when the count and the side word agree with the zones named (always so in QaTa-COV19)."""
        return self == Findings.from_zones(self.zones)

    def report(self, capitalize: bool = False) -> str:
        return format_report(self, capitalize=capitalize)

    def to_dict(self) -> dict:
        """The structured fields with QaTa annotation.json's names."""
        return {"pulmonary_infection": self.sides, "infected_area": self.count, "pseudo_label": list(self.flags)}


def _number(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def format_report(findings: Findings, capitalize: bool = False) -> str:
    """The report sentence of consistent findings (or of a set of zones).

    ``capitalize=True`` writes the official spreadsheets' / ``lvit synth``'s style ("Bilateral ..."); the
    default is annotation.json's lower case.
    """
    if not isinstance(findings, Findings):
        findings = Findings.from_zones(findings)
    if not findings.consistent:
        raise ValueError(f"inconsistent findings {findings}: the template needs count = zones named and "
                         "sides = lungs named")
    if not findings.zones:
        text = NO_INFECTION
    else:
        per_side = [(side, [lv for lv in LEVELS if (lv, side) in findings.zones]) for side in SIDES]
        parts = [f"{' '.join(levels)} {side} lung" for side, levels in per_side if levels]
        n = findings.count
        kind = "unilateral" if findings.sides == 1 else "bilateral"
        text = f"{kind} pulmonary infection, {_number(n)} infected area{'s' if n != 1 else ''}, {' and '.join(parts)}."
    return text[0].upper() + text[1:] if capitalize else text


_LEVEL = "(?:upper|middle|lower)"
_ZONE_PHRASE = rf"({_LEVEL}(?: {_LEVEL})*) (left|right) lung"
_PART = re.compile(rf"^{_ZONE_PHRASE}$")
_ANY_PART = re.compile(rf"\b{_ZONE_PHRASE}\b")
_REPORT = re.compile(
    r"^(?:(?P<none>no pulmonary infection)|(?P<kind>unilateral|bilateral) pulmonary infection, "
    r"(?P<count>\w+) infected areas?, (?P<zones>[a-z ]+?))\s*\.?$"
)


def parse_findings(text: str) -> Findings:
    """The findings of a report in LViT's template (any capitalisation and spacing; final full stop optional).

    Raises ValueError for text that does not follow the template. Field values are taken as written (a report
    saying "two infected areas" of three zones parses as count 2), so they can be compared one by one.
    """
    clean = " ".join(str(text).lower().split())
    match = _REPORT.match(clean)
    if match is None:
        raise ValueError(f"not a report in LViT's template: {text!r}")
    if match["none"]:
        return Findings(0, 0, frozenset())
    word = match["count"]
    if word in NUMBER_WORDS:
        count = NUMBER_WORDS.index(word)
    elif word.isdigit():
        count = int(word)
    else:
        raise ValueError(f"not a report in LViT's template (count {word!r}): {text!r}")
    zones = set()
    for part in match["zones"].split(" and "):
        found = _PART.match(part)
        if found is None:
            raise ValueError(f"not a report in LViT's template (zones {part!r}): {text!r}")
        zones.update((level, found[2]) for level in found[1].split())
    return Findings(sides=1 if match["kind"] == "unilateral" else 2, count=count, zones=frozenset(zones))


def named_zones(text: str) -> frozenset:
    """The (level, side) zones named by the "<levels> <side> lung" phrases of any text, without checking the
    rest of the template (for a report in the template: ``parse_findings(text).zones``; other text: often
    none). Never raises."""
    clean = " ".join(str(text).lower().split())
    return frozenset((level, m[2]) for m in _ANY_PART.finditer(clean) for level in m[1].split())


# --- the mask -> findings rule ---------------------------------------------------------------------------------


def band_edges(height: int, rule: Rule = DEFAULT_RULE) -> tuple[int, int]:
    """Row indices where the upper and the middle zone end: row ``r`` is upper when ``(r + 0.5) / height <
    upper_end``, middle when below ``middle_end``, else lower."""

    def edge(fraction: float) -> int:
        return int(np.clip(np.ceil(fraction * height - 0.5), 0, height))

    return edge(rule.upper_end), edge(rule.middle_end)


def side_edge(width: int) -> int:
    """Columns ``[0, side_edge)`` are the image's left half (the left lung): those whose centre lies left of
    the midline (the centre column of an odd width counts as right)."""
    return width // 2


def zone_pixel_counts(mask: np.ndarray, rule: Rule = DEFAULT_RULE) -> np.ndarray:
    """``[2, 3]`` foreground pixels per (side, level), sides in :data:`SIDES` order, levels in :data:`LEVELS`."""
    mask = _binary(mask)
    h, w = mask.shape
    rows = np.stack([mask[:, : side_edge(w)].sum(axis=1), mask[:, side_edge(w):].sum(axis=1)])  # [2, H]
    e1, e2 = band_edges(h, rule)
    return np.stack([rows[:, :e1].sum(1), rows[:, e1:e2].sum(1), rows[:, e2:].sum(1)], axis=1).astype(np.int64)


def findings_from_counts(counts: np.ndarray, n_pixels: int, rule: Rule = DEFAULT_RULE) -> Findings:
    """The rule applied to :func:`zone_pixel_counts` of a mask with ``n_pixels`` pixels in all."""
    counts = np.asarray(counts)
    named = counts >= max(rule.min_zone_fraction * n_pixels, 1)
    if not named.any() and counts.sum() > 0:  # a small lesion still names the zone holding most of it
        named.flat[int(np.argmax(counts))] = True
    return Findings.from_zones((LEVELS[lv], SIDES[s]) for s, lv in zip(*np.nonzero(named)))


def mask_findings(mask: np.ndarray, rule: Rule = DEFAULT_RULE) -> Findings:
    """The findings the rule reads from a mask ``H x W`` (bool, {0, 1} or {0, 255}; see module doc). Threshold a
    probability map first: every value above 0 of a float array in [0, 1] counts as lesion."""
    mask = _binary(mask)
    return findings_from_counts(zone_pixel_counts(mask, rule), mask.size, rule)


def describe_mask(mask: np.ndarray, *, capitalize: bool = False, rule: Rule = DEFAULT_RULE) -> str:
    """The report of a mask ``H x W`` in LViT's template ("no pulmonary infection." when it is empty)."""
    return format_report(mask_findings(mask, rule), capitalize=capitalize)


def describe_file(path: str | Path, *, capitalize: bool = False, rule: Rule = DEFAULT_RULE) -> str:
    """:func:`describe_mask` of a mask file (DataError naming the file when it cannot be read)."""
    return describe_mask(read_mask(path), capitalize=capitalize, rule=rule)


def _binary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = binarise_mask(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a mask H x W, got shape {mask.shape}")
    if mask.dtype == bool or mask.size == 0 or mask.max() <= 1:
        return mask.astype(bool)
    return binarise_mask(mask).astype(bool)


__all__ = [
    "DEFAULT_RULE",
    "LEVELS",
    "MIDDLE_END",
    "MIN_ZONE_FRACTION",
    "NO_INFECTION",
    "NUMBER_WORDS",
    "SIDES",
    "UPPER_END",
    "ZONES",
    "Findings",
    "Rule",
    "band_edges",
    "describe_file",
    "describe_mask",
    "findings_from_counts",
    "format_report",
    "mask_findings",
    "named_zones",
    "parse_findings",
    "side_edge",
    "zone_pixel_counts",
]
