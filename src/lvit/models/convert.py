"""Load checkpoints saved by the official HUANGLIZI/LViT code into our :class:`~lvit.models.LViT`.

The official training script saves ``{'epoch', 'best_model', 'model', 'state_dict', 'val_loss', 'optimizer'}``
with ``torch.save`` (``state_dict`` keys prefixed ``module.`` when trained under ``nn.DataParallel``). We read
it with ``torch.load(weights_only=True)``, which refuses pickled code, and map every tensor the official
forward pass uses onto our module names by an explicit prefix table (:func:`official_prefixes`). The
official model also carries 10.0M parameters its forward never calls (the model-level ``pix_module1..4``,
the PLAM ``conv_sig``, and per ViT level the unused ``embeddings`` / ``norm`` / ``head`` / ``CTBN*``); those
are recognised and skipped. Anything else that does not fit (a missing key, an unknown key, a shape
mismatch) is listed, every key of it, in one :class:`~lvit.core.errors.CheckpointError`.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..core.errors import CheckpointError

_DOWN_VIT = ("downVit", "downVit1", "downVit2", "downVit3")  # our ViT level 1..4
_UP_VIT = ("upVit", "upVit1", "upVit2", "upVit3")

#: Official tensors that exist in the checkpoint but never take part in the official forward pass.
_UNUSED_OFFICIAL = re.compile(
    r"^(pix_module\d+\."  # model-level PLAMs, instantiated and never called
    r"|up\d\.pixModule\.conv_sig\."  # PLAM's sigmoid branch, never called
    r"|(down|up)Vit\d?\.(norm|head)\."  # final LayerNorm / classification head of each ViT level
    r"|upVit\d?\.embeddings\."  # UpViT levels take tokens, not images
    r"|(down|up)Vit\d?\.CTBN\d?\."  # the CTBN variants a level does not use (the used ones are mapped first)
    r")"
)


def official_prefixes(depth: int = 1) -> dict[str, str]:
    """Our module prefix -> the official one, for every module of our LViT that has weights.

    ``depth`` is the number of transformer blocks per level (1 in the official model); the blocks' own
    parameter names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) are the same
    on both sides, so the prefix of the block list maps them all.
    """
    table = {"stem.": "inc.", "head.": "outc."}
    for i in range(4):
        n = i + 1
        table[f"down.{i}.convs."] = f"down{n}.nConvs."
        table[f"up.{i}.convs."] = f"up{n}.nConvs."
        table[f"up.{i}.attention.conv_avg."] = f"up{n}.pixModule.conv_avg."
        table[f"up.{i}.attention.conv_max."] = f"up{n}.pixModule.conv_max."
        table[f"up.{i}.attention.mlp.0."] = f"up{n}.pixModule.bottleneck.0."
        table[f"up.{i}.attention.mlp.2."] = f"up{n}.pixModule.bottleneck.2."
        table[f"reconstruct.{i}."] = f"reconstruct{n}."
        down, up = _DOWN_VIT[i], _UP_VIT[i]
        table[f"vit_down.{i}.embed.proj."] = f"{down}.embeddings.patch_embeddings."
        table[f"vit_down.{i}.embed.pos_embed"] = f"{down}.embeddings.position_embeddings"
        table[f"vit_down.{i}.reduce."] = f"{down}.CTBN."
        table[f"vit_up.{i}.merge."] = f"{up}.CTBN2."
        for d in range(depth):
            table[f"vit_down.{i}.blocks.{d}."] = f"{down}.Encoder_blocks.{d}."
            table[f"vit_up.{i}.blocks.{d}."] = f"{up}.Encoder_blocks.{d}."
        # Our text chain runs first to last; the official modules are numbered by the level they feed.
        table[f"text_convs.{i}."] = f"text_module{4 - i}."
    table["text_to_patches.proj."] = "downVit.CTBN3."
    return table


def official_name(our_key: str, prefixes: Mapping[str, str]) -> str:
    """The official state-dict key of one of our keys (longest matching prefix wins)."""
    best = max((p for p in prefixes if our_key.startswith(p)), key=len, default=None)
    if best is None:
        raise KeyError(f"no official counterpart known for {our_key!r}")
    return prefixes[best] + our_key[len(best):]


def _strip_wrappers(state_dict: Mapping[str, object]) -> dict[str, object]:
    """Drop a ``module.`` prefix (nn.DataParallel) if every key has it."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def convert_official_state_dict(official: Mapping[str, torch.Tensor], model: nn.Module | None = None,
                                *, source: str = "official state dict") -> dict[str, torch.Tensor]:
    """Map an official LViT state dict onto our key names, checked against ``model`` (default: ``LViT()``).

    Every tensor our model has must be present with its exact shape; official tensors the official forward
    never uses are skipped; anything else is an error. Raises :class:`CheckpointError` listing every key
    that is missing, unexpected, or of the wrong shape. Returns a state dict for ``model.load_state_dict``
    with ``strict=True``.
    """
    if model is None:
        from .lvit import LViT

        model = LViT()
    official = _strip_wrappers(official)
    depth = getattr(getattr(model, "config", None), "vit_depth", 1)
    prefixes = official_prefixes(depth)
    ours = model.state_dict()

    converted: dict[str, torch.Tensor] = {}
    expected: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for key, target in ours.items():
        try:
            name = official_name(key, prefixes)
        except KeyError:
            raise CheckpointError(f"{source}: our model has {key!r}, which has no official counterpart "
                                  "(is this an LViT?)") from None
        expected.add(name)
        if name not in official:
            missing.append(name)
            continue
        tensor = official[name]
        if not isinstance(tensor, torch.Tensor):
            mismatched.append(f"{name} (not a tensor: {type(tensor).__name__})")
        elif tuple(tensor.shape) != tuple(target.shape):
            mismatched.append(f"{name} {tuple(tensor.shape)} vs ours {key} {tuple(target.shape)}")
        else:
            converted[key] = tensor.detach().to(dtype=target.dtype)
    unexpected = sorted(k for k in official if k not in expected and not _UNUSED_OFFICIAL.match(k))

    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {len(mismatched)}: {', '.join(mismatched)}")
    if problems:
        hint = ""
        cfg = getattr(model, "config", None)
        if cfg is not None:
            hint = (f" (model: base_channels={cfg.base_channels}, text_dim={cfg.text_dim}, "
                    f"text_tokens={cfg.text_tokens}, image_size={cfg.image_size}, use_text={cfg.use_text})")
        raise CheckpointError(f"{source} does not fit our LViT{hint}: " + "; ".join(problems))
    return converted


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                             *, source: str = "official state dict") -> nn.Module:
    """Load an in-memory official state dict into ``model`` (strictly, after conversion). Returns ``model``."""
    model.load_state_dict(convert_official_state_dict(state_dict, model, source=source), strict=True)
    return model


def read_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official checkpoint file safely and return its (unwrapped) model state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        import numpy as np

        # The official script stores plain numbers (epoch, val_loss) next to the weights; numpy scalars
        # are data, so allow them, but nothing that can run code.
        extra = [np.dtype, type(np.dtype("float64")), type(np.dtype("float32"))]
        core = getattr(np, "_core", None) or np.core
        scalar = getattr(core.multiarray, "scalar", None)
        if scalar is not None:
            extra.append(scalar)
        with torch.serialization.safe_globals(extra):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused to load: the file contains pickled code or objects that are not "
                              f"plain tensors/numbers ({first}); only load checkpoints you trust, and re-save them "
                              "as a plain state dict") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                              f"{(str(exc).splitlines() or [''])[0][:160]})") from None
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not all(isinstance(k, str) for k in payload):
        raise CheckpointError(f"{path}: expected a state dict (or a dict with 'state_dict'), "
                              f"got {type(payload).__name__}")
    return _strip_wrappers(payload)


def load_official_checkpoint(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load an official LViT checkpoint file into ``model`` (default: a new default ``LViT()``)."""
    if model is None:
        from .lvit import LViT

        model = LViT()
    return load_official_state_dict(model, read_official_checkpoint(path), source=str(path))
