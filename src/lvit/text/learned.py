"""The "learned" text backend: a vocabulary from the training reports and a trainable embedding layer.

Unlike the frozen encoders, its embeddings are model parameters, so they are not cached. Training code uses::

    enc = get_text_encoder("learned", max_tokens=10, texts=train_reports, dim=768)
    ids, mask = enc.tokenize(reports)          # [N, L] int64, [N, L] bool (done once, stored per sample)
    embed = enc.build_module()                 # nn.Module: ids [B, L] -> [B, L, D], trained with the model
    text = embed(ids_batch)                    # feed to LViT as ``text`` with ``text_mask``
    enc.save(run_dir / "vocab.json")           # rebuild later with get_text_encoder("learned:<that path>")

``encode()`` also works (the base contract): it embeds through a module initialised with a fixed seed, which
is only meaningful before training; after training use the trained module.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.io import atomic_write_json
from .base import DEFAULT_MAX_TOKENS, TextEncoder, register_backend
from .reports import OFFICIAL_MIN_WORDS

PAD, UNK = "<pad>", "<unk>"
_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def word_tokens(text: str) -> list[str]:
    """Lower-case words and single punctuation marks: "Upper left lung." -> [upper, left, lung, .]"""
    return _TOKEN.findall(text.lower())


class LearnedTextEmbedding(nn.Module):
    """ids ``[B, L]`` int64 -> embeddings ``[B, L, D]``; id 0 (padding) maps to a zero vector."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)  # [B, L, D]


class LearnedEncoder(TextEncoder):
    trainable = True

    def __init__(
        self,
        vocab: list[str],
        max_tokens: int = DEFAULT_MAX_TOKENS,
        min_words: int = OFFICIAL_MIN_WORDS,
        dim: int = 256,
    ):
        super().__init__(max_tokens, min_words)
        if vocab[:2] != [PAD, UNK]:
            raise ConfigError("learned vocabulary must start with <pad>, <unk>")
        self.vocab = list(vocab)
        self.index = {tok: i for i, tok in enumerate(self.vocab)}
        self.dim = int(dim)
        digest = hashlib.sha256("\n".join(self.vocab).encode()).hexdigest()[:12]
        self.name = f"learned-{digest}"
        self._frozen_module: LearnedTextEmbedding | None = None

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        max_tokens: int = DEFAULT_MAX_TOKENS,
        min_words: int = OFFICIAL_MIN_WORDS,
        dim: int = 256,
        min_count: int = 1,
    ) -> LearnedEncoder:
        """Vocabulary = tokens seen >= ``min_count`` times in the (padded) training reports, sorted by
        frequency then alphabetically, so the same reports always give the same ids."""
        counts = Counter()
        probe = cls([PAD, UNK], max_tokens, min_words, dim)
        for text in probe.prepare(texts):
            counts.update(word_tokens(text))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([PAD, UNK] + words, max_tokens, min_words, dim)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids ``[N, L]`` int64, mask ``[N, L]`` bool). Unknown words map to <unk>; cut/pad to L."""
        ids = torch.zeros(len(texts), self.max_tokens, dtype=torch.long)
        for row, text in enumerate(self.prepare(list(texts))):
            toks = [self.index.get(t, 1) for t in word_tokens(text)][: self.max_tokens]
            ids[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        return ids, ids != 0

    def build_module(self, dim: int | None = None, seed: int = 0) -> LearnedTextEmbedding:
        """A fresh trainable embedding layer (initialised from ``seed`` for reproducibility)."""
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return LearnedTextEmbedding(self.vocab_size, dim or self.dim)
        finally:
            torch.random.set_rng_state(gen_state)

    @torch.no_grad()
    def _encode_prepared(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._frozen_module is None:
            self._frozen_module = self.build_module().eval()
        ids, mask = self.tokenize(texts)  # tokenize() pads again: harmless, the text is already padded
        return self._frozen_module(ids).float(), mask

    @property
    def spec(self) -> str:
        return "learned"

    def to_dict(self) -> dict:
        return {"vocab": self.vocab, "max_tokens": self.max_tokens, "min_words": self.min_words, "dim": self.dim}

    @classmethod
    def from_dict(cls, d: dict) -> LearnedEncoder:
        try:
            return cls(list(d["vocab"]), int(d["max_tokens"]), int(d["min_words"]), int(d["dim"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"learned text encoder state is invalid ({exc})") from None

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LearnedEncoder:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read the learned vocabulary ({exc})") from None


@register_backend("learned")
def _learned(arg, max_tokens, min_words, *, texts=None, dim=None, **_) -> LearnedEncoder:
    if arg:
        return LearnedEncoder.load(arg)
    if texts is None:
        raise ConfigError("text encoder 'learned' needs the training reports to build its vocabulary")
    return LearnedEncoder.from_texts(texts, max_tokens=max_tokens, min_words=min_words, dim=dim or 256)
