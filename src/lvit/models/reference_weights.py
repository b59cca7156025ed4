"""Deterministic reference weights and inputs keyed by the official LViT parameter names.

Used to pin our forward pass against the official HUANGLIZI/LViT code without shipping any checkpoint:
the official model and ours are both given weights from this recipe (ours through
:mod:`lvit.models.convert`), run in eval mode on :func:`reference_inputs`, and their logits compared.
``bench/official_forward.py`` runs the official code and writes ``tests/data/official_lvit_forward.json``;
``tests/test_convert.py`` rebuilds the same weights and checks our model against that file.

It lives in the package (not under ``tests/``) so that the regeneration script and the test import the
very same function, and so that anyone porting or modifying the model can reproduce the check.

Recipe, version :data:`RECIPE_VERSION` (change the version whenever any number below changes):

* every tensor is generated on its own, from its official key alone (so the order of the key list, extra
  keys or missing keys never change another tensor): ``seed`` = the first 8 bytes (little-endian) of
  ``sha256("lvit-reference/v<VERSION>/<key>")``; numbers ``u`` uniform in ``[-1, 1)`` are
  ``(raw >> 11) * 2**-52 - 1`` of the 64-bit words of numpy's ``PCG64(seed).random_raw(n)`` (the bit
  generator's raw stream, which numpy keeps stable; no numpy distribution code is involved), in float64,
  filled in C order, then cast to the requested dtype;
* ``*.num_batches_tracked`` (integer): ``seed % 1000``;
* ``*.running_var``: ``1 + 0.5 u`` (in [0.5, 1.5));  ``*.running_mean``: ``0.2 u``;
* ``*position_embeddings``: ``0.5 u`` (non-zero, unlike the official zero initialisation);
* other 1-D ``*.weight`` (BatchNorm / LayerNorm scales): ``1 + 0.25 u``;  1-D ``*.bias``: ``0.1 u``;
* every other tensor (conv / linear weights, rank >= 2): ``sqrt(3 / fan_in) u``, i.e. standard deviation
  ``1 / sqrt(fan_in)`` with ``fan_in = prod(shape[1:])``.

Inputs (:func:`reference_inputs`): the image is ``(u + 1) / 2`` (in [0, 1)) under the key
``input/<seed>/image``, the text embeddings ``u`` under ``input/<seed>/text``, both float32.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

RECIPE_VERSION = 1
_PREFIX = f"lvit-reference/v{RECIPE_VERSION}/"


def key_seed(key: str) -> int:
    """The 64-bit seed of ``key``: first 8 bytes (little-endian) of sha256 of the versioned key."""
    return int.from_bytes(hashlib.sha256((_PREFIX + key).encode("utf-8")).digest()[:8], "little")


def uniform(key: str, n: int) -> np.ndarray:
    """``n`` float64 numbers uniform in [-1, 1), from the raw PCG64 stream seeded by :func:`key_seed`."""
    raw = np.random.PCG64(key_seed(key)).random_raw(n) if n else np.zeros(0, dtype=np.uint64)
    raw = np.asarray(raw, dtype=np.uint64)
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0 ** -52 - 1.0


def reference_tensor(key: str, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The recipe's tensor for one official ``key`` of ``shape`` (see the module docstring)."""
    shape = tuple(int(s) for s in shape)
    if not dtype.is_floating_point:  # num_batches_tracked: irrelevant in eval mode, but deterministic
        return torch.full(shape, key_seed(key) % 1000, dtype=dtype)
    n = math.prod(shape)
    u = uniform(key, n)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_var":
        values = 1.0 + 0.5 * u
    elif leaf == "running_mean":
        values = 0.2 * u
    elif key.endswith("position_embeddings"):
        values = 0.5 * u
    elif len(shape) <= 1 and leaf == "weight":
        values = 1.0 + 0.25 * u
    elif len(shape) <= 1 and leaf == "bias":
        values = 0.1 * u
    else:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        values = math.sqrt(3.0 / fan_in) * u
    return torch.from_numpy(values.reshape(shape)).to(dtype)


def reference_state_dict(entries: Iterable[tuple[str, Sequence[int], torch.dtype]]) -> dict[str, torch.Tensor]:
    """``(official key, shape, dtype)`` triples -> a state dict of :func:`reference_tensor` values."""
    return {key: reference_tensor(key, shape, dtype) for key, shape, dtype in entries}


def default_dtype(key: str) -> torch.dtype:
    """int64 for ``num_batches_tracked`` (as torch stores it), float32 for everything else."""
    return torch.int64 if key.endswith("num_batches_tracked") else torch.float32


def reference_inputs(seed: int = 0, batch: int = 1, image_size: int = 224, in_channels: int = 3,
                     text_tokens: int = 10, text_dim: int = 768) -> tuple[torch.Tensor, torch.Tensor]:
    """``image [batch, in_channels, S, S]`` in [0, 1) and ``text [batch, text_tokens, text_dim]``, float32."""
    image_shape = (batch, in_channels, image_size, image_size)
    text_shape = (batch, text_tokens, text_dim)
    image = (uniform(f"input/{seed}/image", math.prod(image_shape)) + 1.0) / 2.0
    text = uniform(f"input/{seed}/text", math.prod(text_shape))
    return (torch.from_numpy(image.reshape(image_shape)).float(),
            torch.from_numpy(text.reshape(text_shape)).float())


# --- output fingerprint ------------------------------------------------------------------------------------
#: Block side for the block means (16 -> a 14x14 grid per map at 224x224) and pixels sampled per map.
FINGERPRINT_BLOCK = 16
FINGERPRINT_PIXELS = 128


def fingerprint_positions(height: int, width: int, n: int = FINGERPRINT_PIXELS) -> list[tuple[int, int]]:
    """``n`` pixel positions (y, x), fixed by the recipe (key ``fingerprint/<H>x<W>``), corners included."""
    u = uniform(f"fingerprint/{height}x{width}", 2 * n)
    ys = np.floor((u[0::2] + 1.0) / 2.0 * height).astype(int)
    xs = np.floor((u[1::2] + 1.0) / 2.0 * width).astype(int)
    fixed = [(0, 0), (0, width - 1), (height - 1, 0), (height - 1, width - 1)]
    return fixed + [(int(y), int(x)) for y, x in zip(ys[4:], xs[4:])]


def output_fingerprint(logits: torch.Tensor) -> dict:
    """A small summary of ``logits [B, C, H, W]`` whose every number moves by at most ``max |a - b|`` when the
    logits change from ``a`` to ``b``: mean, RMS, block means over ``FINGERPRINT_BLOCK``-pixel squares and the
    values at :func:`fingerprint_positions` (all computed in float64, listed per ``[b][c]``)."""
    x = logits.detach().to(torch.float64)
    b, c, h, w = x.shape
    k = FINGERPRINT_BLOCK
    if h % k or w % k:
        raise ValueError(f"logits height and width must be multiples of {k}, got {h}x{w}")
    blocks = x.reshape(b, c, h // k, k, w // k, k).mean(dim=(3, 5))
    positions = fingerprint_positions(h, w)
    ys = torch.tensor([p[0] for p in positions])
    xs = torch.tensor([p[1] for p in positions])
    return {
        "shape": [b, c, h, w],
        "mean": float(x.mean()),
        "rms": float(x.pow(2).mean().sqrt()),
        "block": k,
        "block_means": blocks.reshape(b, c, -1).tolist(),
        "positions": [list(p) for p in positions],
        "pixels": x[:, :, ys, xs].tolist(),
    }


def fingerprint_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two :func:`output_fingerprint` values (inf if the layout differs
    or any value is NaN)."""
    if a["shape"] != b["shape"] or a["positions"] != b["positions"] or a["block"] != b["block"]:
        return math.inf
    diffs = [np.abs(np.asarray(a[name], dtype=np.float64) - np.asarray(b[name], dtype=np.float64)).ravel()
             for name in ("mean", "rms", "block_means", "pixels")]
    if any(d.shape == (0,) for d in diffs):
        return math.inf
    worst = float(np.max(np.concatenate(diffs)))
    return math.inf if math.isnan(worst) else worst  # a NaN anywhere never passes
