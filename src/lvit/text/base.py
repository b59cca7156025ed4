"""The text-encoder contract (:class:`TextEncoder`) and the registry of backends behind
:func:`get_text_encoder`.

A backend registers a factory under a scheme name; a spec string ``"<scheme>"`` or ``"<scheme>:<argument>"``
selects it (``minilm``, ``hf:/path/to/folder``, ``learned``, ``learned:/path/vocab.json``). Backends live in
their own modules (:mod:`.encoders`, :mod:`.learned`), which import this one; importing :mod:`lvit.text`
registers them all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core.errors import ConfigError
from .reports import OFFICIAL_MIN_WORDS, prepare_report

DEFAULT_MAX_TOKENS = 10
_BACKENDS: dict[str, Callable[..., TextEncoder]] = {}


class TextEncoder:
    """Base class. Subclasses set ``name`` (unique per model: it keys the cache), ``dim`` and implement
    :meth:`_encode_prepared`.

    ``trainable`` is False for frozen encoders whose outputs may be cached; the learned backend sets it to
    True and offers ``tokenize`` / ``build_module`` instead.
    """

    name: str = "base"
    dim: int = 0
    trainable: bool = False

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS, min_words: int = OFFICIAL_MIN_WORDS):
        if max_tokens < 1:
            raise ConfigError(f"text max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = int(max_tokens)
        self.min_words = int(min_words)

    def prepare(self, texts: list[str]) -> list[str]:
        """The exact strings the model sees (official " EOF XXX" padding); the cache hashes these."""
        return [prepare_report(t, self.min_words) for t in texts]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` -> (emb ``[N, L, D]`` float32, mask ``[N, L]`` bool). Deterministic."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.max_tokens, self.dim), torch.zeros(0, self.max_tokens, dtype=torch.bool)
        return self._encode_prepared(self.prepare(texts))

    def _encode_prepared(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        """What a run config needs to rebuild this encoder (see ``get_text_encoder``)."""
        return {"spec": self.spec, "max_tokens": self.max_tokens, "min_words": self.min_words, "dim": self.dim}

    @property
    def spec(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, max_tokens={self.max_tokens})"


def register_backend(scheme: str):
    """Decorator: ``factory(argument, max_tokens, min_words, *, texts, dim, batch_size, device) -> TextEncoder``
    serves the specs ``scheme`` and ``scheme:argument`` (argument ``""`` when absent)."""

    def add(factory):
        _BACKENDS[scheme] = factory
        return factory

    return add


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_text_encoder(
    spec: str = "minilm",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    *,
    min_words: int = OFFICIAL_MIN_WORDS,
    texts: list[str] | None = None,
    dim: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> TextEncoder:
    """Build an encoder from its spec string.

    ``"minilm"`` | ``"hf:/path"`` | ``"learned"`` (needs ``texts``: the training reports, and ``dim``) |
    ``"learned:/path/vocab.json"`` (a vocabulary saved by :meth:`LearnedEncoder.save`).
    """
    spec = (spec or "minilm").strip()
    scheme, _, argument = spec.partition(":")
    if scheme not in _BACKENDS:
        raise ConfigError(f"unknown text encoder {spec!r}; use 'minilm', 'hf:/path/to/folder' or 'learned'")
    return _BACKENDS[scheme](argument, max_tokens, min_words, texts=texts, dim=dim, batch_size=batch_size,
                             device=device)
