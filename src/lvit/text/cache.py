"""On-disk cache of report embeddings, so a dataset is encoded once.

One safetensors file per (encoder name, max_tokens) in the cache folder, holding one row per distinct
report: ``emb [M, L, D]`` float32 (float16 in a half-precision model folder; read back as float32), ``mask
[M, L]`` bool, and in its one metadata entry the sha256 of each row's prepared text. Encoding looks every
report up by hash and runs the model only on the misses (a changed report re-encodes that report alone); the
file is then rewritten atomically. The model is loaded lazily by
the encoder, so a full cache hit never loads it. A damaged cache file is ignored and rebuilt (it is only a
cache). Frozen encoders only: a trainable (``learned``) encoder passes straight through.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from ..core.errors import LvitError
from ..core.io import atomic_path
from .base import TextEncoder
from .reports import text_sha256

CACHE_DIRNAME = ".lvit_cache"
META_KEY = "lvit_text_cache"  # the file's one metadata entry: JSON of encoder, max_tokens, dim and the row hashes


def default_cache_dir(dataset_root: str | Path) -> Path:
    return Path(dataset_root) / CACHE_DIRNAME


def cache_file(encoder: TextEncoder, cache_dir: str | Path) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder.name)
    return Path(cache_dir) / f"text-{slug}-L{encoder.max_tokens}.safetensors"


def read_cache_rows(path: Path, encoder: TextEncoder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The rows of a cache file: ``{sha256 of the prepared report: (emb [L, D], mask [L])}``; ``{}`` (with a
    warning) when the file is damaged or made by another encoder, ``{}`` when there is none."""
    if not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if META_KEY in meta:
                meta = json.loads(meta[META_KEY])
                hashes = meta["hashes"]
            else:  # files written before the one-key format: the hashes under their own key
                hashes = json.loads(meta.get("hashes", "[]"))
            emb, mask = fh.get_tensor("emb").float(), fh.get_tensor("mask")
    except Exception as exc:  # noqa: BLE001 - any damage means "rebuild", never "crash training"
        warnings.warn(f"{path}: unreadable text cache ignored ({exc})", stacklevel=3)
        return {}
    shape_ok = emb.ndim == 3 and emb.shape[1:] == (encoder.max_tokens, encoder.dim)
    if not shape_ok or mask.shape != emb.shape[:2] or len(hashes) != emb.shape[0]:
        warnings.warn(f"{path}: text cache does not fit encoder {encoder.name}; rebuilding", stacklevel=3)
        return {}
    return {h: (emb[i], mask[i]) for i, h in enumerate(hashes)}


def _save_rows(path: Path, encoder: TextEncoder, rows: dict[str, tuple[torch.Tensor, torch.Tensor]],
               dtype: torch.dtype = torch.float32) -> None:
    from safetensors.torch import save_file

    hashes = sorted(rows)
    emb = torch.stack([rows[h][0] for h in hashes]).to(dtype).contiguous()
    mask = torch.stack([rows[h][1] for h in hashes]).contiguous()
    # One metadata key: safetensors writes its metadata map in no fixed order, so several keys would give the
    # same rows different bytes (and a shipped cache a different sha256) from one write to the next.
    meta = {"encoder": encoder.name, "max_tokens": encoder.max_tokens, "dim": encoder.dim, "hashes": hashes}
    with atomic_path(path) as tmp:
        save_file({"emb": emb, "mask": mask}, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def _stored_half(path: Path) -> bool:
    """Whether the cache file ``path`` stores its embeddings in float16 (False when missing or damaged: such a
    base is rebuilt in float32)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_slice("emb").get_dtype() == "F16"
    except Exception:  # noqa: BLE001
        return False


def cache_file_bytes(encoder: TextEncoder, texts: list[str], base: str | Path | None = None,
                     half: bool | None = None) -> bytes:
    """A cache file (the format above) holding ``texts``' embeddings, as bytes: what a model folder ships so that
    its training reports never need the text model at prediction time. ``base``: a cache file whose rows are kept
    as they are (only the reports it lacks are encoded: the same text model on another CPU differs in the last
    bits, and a shipped row's figures were measured with its own bits). ``half``: the embeddings stored as
    float16, half the bytes (a model folder with float16 weights; its figures are measured with these bits);
    None: as ``base`` stores them (float32 without one), so adding rows never changes the kept ones."""
    import tempfile

    rows = read_cache_rows(Path(base), encoder) if base is not None else {}
    if half is None:
        half = base is not None and _stored_half(Path(base))
    unique = list(dict.fromkeys(texts))
    missing = [t for t, key in zip(unique, map(text_sha256, encoder.prepare(unique))) if key not in rows]
    if missing:
        emb, mask = encoder.encode(missing)
        rows.update({text_sha256(t): (emb[i], mask[i]) for i, t in enumerate(encoder.prepare(missing))})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.safetensors"
        _save_rows(path, encoder, rows, torch.float16 if half else torch.float32)
        return path.read_bytes()


def encode_with_rows(encoder: TextEncoder, texts: list[str], shipped: str | Path,
                     cache_dir: str | Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_cached`, looking each report up in the read-only cache file ``shipped`` first (never
    written); only the reports it lacks reach ``cache_dir``'s cache and the encoder."""
    texts = list(texts)
    rows = read_cache_rows(Path(shipped), encoder)
    keys = [text_sha256(t) for t in encoder.prepare(texts)]
    missing = [t for t, k in zip(texts, keys) if k not in rows]
    if missing:
        emb, mask = encode_cached(encoder, missing, cache_dir)
        for i, key in enumerate(text_sha256(t) for t in encoder.prepare(missing)):
            rows[key] = (emb[i], mask[i])
    if not texts:
        return encoder.encode(texts)
    return torch.stack([rows[k][0] for k in keys]), torch.stack([rows[k][1] for k in keys])


def encode_cached(
    encoder: TextEncoder, texts: list[str], cache_dir: str | Path | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``encoder.encode(texts)`` through the cache in ``cache_dir`` (None: no cache)."""
    texts = list(texts)
    if cache_dir is None or encoder.trainable or not texts:
        return encoder.encode(texts)
    path = cache_file(encoder, cache_dir)
    rows = read_cache_rows(path, encoder)
    prepared = encoder.prepare(texts)
    keys = [text_sha256(t) for t in prepared]
    missing: dict[str, str] = {}
    for key, raw in zip(keys, texts):
        if key not in rows and key not in missing:
            missing[key] = raw
    if missing:
        emb, mask = encoder.encode(list(missing.values()))
        for i, key in enumerate(missing):
            rows[key] = (emb[i], mask[i])
        try:
            _save_rows(path, encoder, rows)
        except LvitError as exc:  # e.g. a read-only dataset folder: work on, just without a cache
            warnings.warn(f"text cache not written ({exc}); pass another cache folder to keep it", stacklevel=2)
    return torch.stack([rows[k][0] for k in keys]), torch.stack([rows[k][1] for k in keys])


class CachedEncoder(TextEncoder):
    """A :class:`TextEncoder` whose ``encode`` goes through :func:`encode_cached`."""

    def __init__(self, encoder: TextEncoder, cache_dir: str | Path | None):
        self.inner = encoder
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.name, self.dim, self.trainable = encoder.name, encoder.dim, encoder.trainable
        self.max_tokens, self.min_words = encoder.max_tokens, encoder.min_words

    @property
    def spec(self) -> str:
        return self.inner.spec

    def prepare(self, texts: list[str]) -> list[str]:
        return self.inner.prepare(texts)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_cached(self.inner, texts, self.cache_dir)
