"""What a run knows of its training reports, and checks of a new report against it.

At training time :func:`write_training_words` records the distinct words of the training reports in
``RUN/report_words.json`` (a few hundred words for QaTa-COV19: one small JSON file). At prediction time
:class:`ReportChecker` says, per report, how many word pieces (tokens) the model keeps of how many it has, and
whether the report shares any word with the training reports: a report in another language, of emoji or of
words never seen in training still gives a mask, and without this check that mask would look as confident as
any other. Runs trained before the file existed get a note instead (or, for the learned backend, the words of
its ``vocab.json``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..core.io import atomic_write_json

WORDS_FILE = "report_words.json"
_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits in any script: "Opacité", "右下肺", "lung"


def report_words(text: str) -> set[str]:
    """The distinct lower-case words of a report (any script; punctuation, symbols and emoji are not words)."""
    return set(_WORD.findall(str(text).lower()))


def write_training_words(run_dir: str | Path, texts: Iterable[str]) -> Path:
    """Record the words of the training reports in ``run_dir/report_words.json`` (atomic)."""
    texts = [str(t) for t in texts]
    words: set[str] = set()
    for text in texts:
        words |= report_words(text)
    return atomic_write_json(Path(run_dir) / WORDS_FILE, {
        "about": "distinct words of the training reports (lower case); lvit predict warns about a report "
                 "that shares none of them",
        "n_reports": len(texts), "words": sorted(words)})


def read_training_words(run_dir: str | Path | None) -> set[str] | None:
    """The training reports' words of a run; None when the run does not record them (older runs)."""
    if run_dir is None:
        return None
    run_dir = Path(run_dir)
    try:
        data = json.loads((run_dir / WORDS_FILE).read_text(encoding="utf-8"))
        return {str(w) for w in data["words"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:  # learned text backend: its vocabulary is made of the training reports' words
        data = json.loads((run_dir / "vocab.json").read_text(encoding="utf-8"))
        vocab = data.get("vocab") if isinstance(data, dict) else data
        return {w for w in map(str, vocab) if report_words(w)} - {"eof", "xxx"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass
class ReportCheck:
    """What the model makes of one report: ``tokens`` it has, ``kept`` of them (the model's L), its
    ``words`` and how many of them the training reports contain (``known``; None: unknown to this run).
    ``tokens`` = ``kept`` = 0 when the run's text backend has no tokenizer this check can read."""

    tokens: int
    kept: int
    words: int
    known: int | None

    @property
    def truncated(self) -> bool:
        return self.tokens > self.kept

    @property
    def unfamiliar(self) -> bool:
        """True when the report is far from the training reports: fewer than two of its words, or under a quarter
        of them, are words those reports use (another language, emoji, free text). Reworded reports in the same
        vocabulary of sides, zones and counts are not."""
        return self.known is not None and self.known < max(2, self.words / 4)


def _word_piece_counter(folder: Path):
    """``text -> number of word pieces`` of a Hugging Face encoder folder's tokenizer: its ``tokenizer.json``
    through the light ``tokenizers`` library where there is one (no transformers import: a checked report costs
    milliseconds, not seconds), else transformers' AutoTokenizer."""
    from ..core.errors import ConfigError

    def problem(exc: BaseException) -> ConfigError:
        return ConfigError(f"{folder}: cannot load the text model's tokenizer "
                           f"({(str(exc).splitlines() or [type(exc).__name__])[0]})")

    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - the library raises its own exception type
            raise problem(exc) from None
        tokenizer.no_truncation()  # count every piece: the truncation check is the point
        tokenizer.no_padding()
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        auto = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise problem(exc) from None
    return lambda text: len(auto(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])


class ReportChecker:
    """Checks reports against a run's text settings (``config.yaml``'s ``text_encoder``) and training words."""

    def __init__(self, run_config: dict, run_dir: str | Path | None):
        info = run_config.get("text_encoder") or {}
        self.spec = str(info.get("spec") or "minilm")
        self.max_tokens = int(info.get("max_tokens") or (run_config.get("model") or {}).get("text_tokens", 10))
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.known_words = read_training_words(run_dir)
        self._tokenizer = None

    def count_tokens(self, prepared: str) -> int | None:
        """Word pieces of ``prepared`` as the run's encoder splits it (None: a backend this check cannot read)."""
        if self.spec == "learned" or self.spec.startswith("learned:"):
            from . import word_tokens

            return len(word_tokens(prepared))
        if not (self.spec == "minilm" or self.spec.startswith("hf:")):
            return None
        if self._tokenizer is None:
            from . import minilm_path

            folder = minilm_path() if self.spec == "minilm" else Path(self.spec.removeprefix("hf:")).expanduser()
            self._tokenizer = _word_piece_counter(folder)
        return self._tokenizer(prepared)

    def check(self, text: str) -> ReportCheck:
        # The report's own word pieces: the official " EOF XXX" padding of short reports is cut freely.
        tokens = self.count_tokens(" ".join(str(text).split()))
        words = report_words(text)
        known = None if self.known_words is None else len(words & self.known_words)
        if tokens is None:  # unknown tokenizer: no truncation check
            return ReportCheck(tokens=0, kept=0, words=len(words), known=known)
        return ReportCheck(tokens=tokens, kept=min(tokens, self.max_tokens), words=len(words), known=known)

    def check_many(self, texts: Iterable[str]) -> list[ReportCheck]:
        return [self.check(t) for t in texts]

    def no_record_note(self) -> str:
        where = self.run_dir if self.run_dir is not None else "this checkpoint"
        return (f"{where}: the run does not record its training reports' words ({WORDS_FILE}; runs trained "
                "before lvit recorded them): reports are not checked for unknown words")


__all__ = ["WORDS_FILE", "ReportCheck", "ReportChecker", "read_training_words", "report_words",
           "write_training_words"]
