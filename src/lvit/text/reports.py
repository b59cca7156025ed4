"""Report text preprocessing shared by every encoder: official padding, left/right swap, hashing."""

from __future__ import annotations

import hashlib
import re

from ..core.errors import ConfigError

# The official loader (utils.read_text) appends " EOF XXX" (9 - n_words) times to reports shorter than
# nine words, so every report yields at least ~10 word pieces before it is cut to 10 tokens.
EOF_PAD = " EOF XXX"
OFFICIAL_MIN_WORDS = 9

_SIDE_WORDS = re.compile(r"\b(left|right)\b", flags=re.IGNORECASE)


def prepare_report(text: str, min_words: int = OFFICIAL_MIN_WORDS) -> str:
    """Strip the report and pad it the official way: ``+ " EOF XXX" * (min_words - n_words)``."""
    text = " ".join(str(text).split())
    n_words = len(text.split())
    if n_words < min_words:
        text = text + EOF_PAD * (min_words - n_words)
    return text


def swap_left_right(text: str) -> str:
    """Swap the words "left" and "right" (keeping their capitalisation) for a horizontally flipped image.

    >>> swap_left_right("Upper Left lung and lower right lung.")
    'Upper Right lung and lower left lung.'
    """

    def repl(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other

    return _SIDE_WORDS.sub(repl, text)


def text_sha256(text: str) -> str:
    """Hex sha256 of the UTF-8 text: the per-report cache key."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_ZONE_SWAP = {"upper": "lower", "lower": "upper", "top": "bottom", "bottom": "top"}
_ZONE_WORDS = re.compile(r"\b(upper|lower|top|bottom)\b", re.IGNORECASE)


def _same_case(word: str, like: str) -> str:
    if like.isupper():
        return word.upper()
    if like[0].isupper():
        return word.capitalize()
    return word


def counterfactual_report(text: str) -> str:
    """A changed report for the text-attribution view: left <-> right, else upper <-> lower zones.

    Raises :class:`ConfigError` when the report names neither a side nor a zone (then pass ``--alt-text``).
    """
    swapped = swap_left_right(text)
    if swapped != text:
        return swapped
    swapped = _ZONE_WORDS.sub(lambda m: _same_case(_ZONE_SWAP[m.group(0).lower()], m.group(0)), text)
    if swapped != text:
        return swapped
    raise ConfigError(f"cannot make a changed report from {text!r} (it names no side or zone); pass --alt-text")
