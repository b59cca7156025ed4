"""Start training from another run's weights: every tensor whose name and shape match is copied.

The official code's best figures start LViT from a pre-trained U-Net (``LViT_pretrain``). lvit's U-Net uses
the names of LViT's CNN branch (``stem``, ``down.i``, ``up.i.convs``, ``head``), so a U-Net run loads into
LViT's CNN branch this way and leaves the ViT branch, PLAM and the text modules at their initialisation.
What was and was not loaded is written to ``init_from.json`` in the new run folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..io import atomic_write_json

REPORT_NAME = "init_from.json"


def source_weights(source: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(weights file, state dict) of a run folder (its best weights, else its last) or a .safetensors file."""
    from ..runs import load_weights, resolve_run

    _, weights = resolve_run(source)
    if weights.suffix != ".safetensors":
        raise CheckpointError(f"{weights}: --init-from takes a run folder or a .safetensors weights file")
    return weights, load_weights(weights)


def load_matching(model: nn.Module, source: str | Path) -> dict:
    """Copy into ``model`` every tensor of ``source`` whose name and shape match; return what happened.

    Raises CheckpointError (one line) when nothing matches: a wrong source, not a partial start.
    """
    weights, state = source_weights(source)
    target = model.state_dict()
    loaded, skipped = [], []
    for key, tensor in state.items():
        if key not in target:
            skipped.append({"key": key, "reason": "no tensor of this name in the model"})
        elif tuple(target[key].shape) != tuple(tensor.shape):
            skipped.append({"key": key,
                            "reason": f"shape {list(tensor.shape)} vs the model's {list(target[key].shape)}"})
        else:
            loaded.append(key)
    if not loaded:
        raise CheckpointError(f"{weights}: no tensor matches this model by name and shape "
                              f"({len(state)} in the file, {len(target)} in the model); nothing to start from")
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    missing = sorted(set(target) - set(loaded))
    return {
        "source": str(Path(source)),
        "weights": str(weights),
        "loaded": loaded,
        "skipped_from_source": skipped,
        "left_at_initialisation": missing,
        "counts": {"loaded": len(loaded), "skipped_from_source": len(skipped),
                   "left_at_initialisation": len(missing)},
    }


def write_report(run_dir: str | Path, report: dict) -> Path:
    return atomic_write_json(Path(run_dir) / REPORT_NAME, report)
