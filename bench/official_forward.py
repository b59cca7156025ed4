"""Regenerate tests/data/official_lvit_forward.json: the official LViT's logits on the reference recipe.

    python bench/official_forward.py --official /path/to/LViT-checkout [--commit SHA] [--out FILE]

Imports ``nets/LViT.py`` from a checkout of the official code (HUANGLIZI/LViT; nothing of it is copied here),
builds the official model at its only size (224x224, base_channel 64, text [B, 10, 768], one class), loads
the deterministic weights of :mod:`lvit.models.reference_weights` under the official parameter names, runs it
in eval mode on :func:`~lvit.models.reference_weights.reference_inputs` and stores a fingerprint of the
logits (the input of the final sigmoid, read with a forward hook on ``outc``). ``tests/test_convert.py``
then checks that our LViT, loaded through :mod:`lvit.models.convert`, reproduces it within 1e-5.

The official ``nets/Vit.py`` imports ``DropPath`` from timm but only instantiates it for a drop-path rate
above zero, which LViT never uses; when timm is not installed a stand-in that refuses to be built is put in
its place. ``--commit`` defaults to ``git rev-parse HEAD`` of the checkout (required for an exported tree).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path

import torch
from benchkit import REPO
from torch import nn

from lvit.core.io import atomic_write_text
from lvit.models.reference_weights import (
    RECIPE_VERSION,
    default_dtype,
    output_fingerprint,
    reference_inputs,
    reference_state_dict,
    reference_tensor,
    uniform,
)

DEFAULT_OUT = REPO / "tests" / "data" / "official_lvit_forward.json"
TABLE = REPO / "tests" / "data" / "official_lvit_state_dict.txt"
NETS_FILES = ("nets/LViT.py", "nets/Vit.py", "nets/pixlevel.py")
INPUT_SEED = 0
TOLERANCE = 1e-5
#: Recipe spot checks stored in the file, so that a changed recipe (not a changed model) is reported as such.
CHECK_KEYS = ("inc.conv.weight", "downVit.embeddings.position_embeddings", "up1.nConvs.0.norm.running_var",
              "upVit3.Encoder_blocks.0.attn.qkv.bias")


def _install_droppath_stand_in() -> None:
    try:
        import timm.models.layers  # noqa: F401
        return
    except ImportError:
        pass

    class DropPath(nn.Module):  # only built when drop_path > 0, which the official LViT never asks for
        def __init__(self, *args, **kwargs):
            raise RuntimeError("the official code asked for DropPath; install timm to run it")

    for name in ("timm", "timm.models", "timm.models.layers"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["timm.models.layers"].DropPath = DropPath


def load_official_class(checkout: Path):
    """The official ``LViT`` class, imported from ``checkout/nets``."""
    if not (checkout / "nets" / "LViT.py").is_file():
        raise SystemExit(f"{checkout}: no nets/LViT.py here; pass the root of a HUANGLIZI/LViT checkout")
    _install_droppath_stand_in()
    sys.path.insert(0, str(checkout))
    from nets.LViT import LViT  # type: ignore[import-not-found]

    return LViT


def _commit(checkout: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"{checkout} is not a git checkout: pass --commit with the official commit hash") from None


def _table_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in TABLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, rest = line.split(" ", 1)
            dims = rest[rest.index("(") + 1:rest.index(")")]
            shapes[name] = tuple(int(x) for x in dims.split(",") if x.strip())
    return shapes


def _round(obj):
    """Floats to 9 significant digits (float32 values survive exactly enough; the file stays small)."""
    if isinstance(obj, float):
        return float(f"{obj:.9g}")
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    return obj


def _dump(obj: dict) -> str:
    """Top-level and second-level keys one per line, everything deeper on the same line."""
    lines = ["{"]
    items = list(obj.items())
    for i, (key, value) in enumerate(items):
        end = "," if i < len(items) - 1 else ""
        if isinstance(value, dict):
            lines.append(f" {json.dumps(key)}: {{")
            sub = list(value.items())
            for j, (k, v) in enumerate(sub):
                lines.append(f"  {json.dumps(k)}: {json.dumps(v)}" + ("," if j < len(sub) - 1 else ""))
            lines.append(" }" + end)
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}{end}")
    return "\n".join(lines + ["}"]) + "\n"


def recipe_checks(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The first values of a few recipe tensors (CHECK_KEYS) and sums of the inputs."""
    checks = {}
    for key in CHECK_KEYS:
        checks[key] = reference_tensor(key, shapes[key], default_dtype(key)).flatten()[:4].double().tolist()
    image, text = reference_inputs(INPUT_SEED)
    checks["input.image.sum"] = float(image.double().sum())
    checks["input.text.sum"] = float(text.double().sum())
    checks["uniform(probe, 4)"] = uniform("probe", 4).tolist()
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--official", type=Path, required=True, help="root of a HUANGLIZI/LViT checkout (has nets/)")
    p.add_argument("--commit", help="official commit hash (default: git rev-parse HEAD of the checkout)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    checkout = args.official.resolve()
    commit = _commit(checkout, args.commit)
    official_cls = load_official_class(checkout)
    torch.manual_seed(0)  # the official constructor draws its own initialisation; all of it is overwritten
    model = official_cls(types.SimpleNamespace(base_channel=64), n_channels=3, n_classes=1, img_size=224)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != _table_shapes():
        raise SystemExit(f"the official state dict differs from {TABLE.name}: update the table first")
    if any(v.dtype != default_dtype(k) for k, v in state.items()):
        raise SystemExit("an official tensor has a dtype the recipe does not expect")
    model.load_state_dict(reference_state_dict((k, v.shape, v.dtype) for k, v in state.items()), strict=True)
    model.eval()

    captured = {}
    model.outc.register_forward_hook(lambda module, inputs, output: captured.setdefault("logits", output.clone()))
    image, text = reference_inputs(INPUT_SEED)
    with torch.no_grad():
        probs = model(image, text)
    logits = captured["logits"]
    if not torch.allclose(torch.sigmoid(logits), probs, atol=1e-7, rtol=0):
        raise SystemExit("the hooked outc output is not the input of the final sigmoid")

    result = {
        "what": "official LViT logits (before the sigmoid) on the lvit.models.reference_weights recipe, eval mode",
        "regenerate": "python bench/official_forward.py --official /path/to/HUANGLIZI-LViT-checkout",
        "official": {"repository": "HUANGLIZI/LViT", "commit": commit,
                     "sha256": {f: hashlib.sha256((checkout / f).read_bytes()).hexdigest() for f in NETS_FILES}},
        "config": {"official": {"base_channel": 64, "n_channels": 3, "n_classes": 1, "img_size": 224},
                   "lvit": {"image_size": 224, "in_channels": 3, "n_classes": 1, "base_channels": 64,
                            "text_dim": 768, "text_tokens": 10}},
        "recipe_version": RECIPE_VERSION,
        "input": {"seed": INPUT_SEED, "batch": 1, "image_size": 224, "in_channels": 3, "text_tokens": 10,
                  "text_dim": 768},
        "tolerance": TOLERANCE,
        "generated_with": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "recipe_check": recipe_checks(shapes),
        "logits": output_fingerprint(logits),
    }
    atomic_write_text(args.out, _dump(_round(result)))
    print(f"wrote {args.out} (official {commit[:12]}; logits mean {result['logits']['mean']:.6f}, "
          f"rms {result['logits']['rms']:.6f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
