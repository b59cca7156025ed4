"""Start training from another run's weights: every tensor whose name and shape match is copied.

The official code's best figures start LViT from a pre-trained U-Net (``LViT_pretrain``). lvit's U-Net uses
the names of LViT's CNN branch (``stem``, ``down.i``, ``up.i.convs``, ``head``), so a U-Net run loads into
LViT's CNN branch this way and leaves the ViT branch, PLAM and the text modules at their initialisation.
What was and was not loaded is written to ``init_from.json`` in the new run folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..core.errors import CheckpointError
from ..core.io import atomic_write_json

REPORT_NAME = "init_from.json"


def source_weights(source: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(weights file, state dict) of a run folder (its best weights, else its last) or a .safetensors file."""
    from ..artifacts.runs import load_weights, resolve_run

    _, weights = resolve_run(source)
    if weights.suffix != ".safetensors":
        raise CheckpointError(f"{weights}: --init-from takes a run folder or a .safetensors weights file")
    return weights, load_weights(weights)


#: A part of the network counts as started from the source when this share of its weights (elements) loaded;
#: only parts holding at least MAJOR_PART of the network's weights can make a start (a tiny projection whose shape
#: does not depend on the width fits any LViT of the same image size).
PART_COVERED = 0.5
MAJOR_PART = 0.01


def _part(key: str) -> str:
    return key.split(".", 1)[0]  # the network's top-level parts: stem, down, vit_down, up, head, ...


def part_sizes(target: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of the network's weights (floating-point elements) held by each top-level part."""
    sizes: dict[str, int] = {}
    for key, tensor in target.items():
        if tensor.is_floating_point():
            sizes[_part(key)] = sizes.get(_part(key), 0) + tensor.numel()
    total = sum(sizes.values()) or 1
    return {part: n / total for part, n in sizes.items()}


def part_coverage(target: dict[str, torch.Tensor], loaded: list[str]) -> dict[str, float]:
    """Share of each top-level part's weights (floating-point elements; BatchNorm's step counters do not count)
    that came from the source."""
    total: dict[str, int] = {}
    done: dict[str, int] = {}
    loaded_set = set(loaded)
    for key, tensor in target.items():
        if not tensor.is_floating_point():
            continue
        part = _part(key)
        total[part] = total.get(part, 0) + tensor.numel()
        if key in loaded_set:
            done[part] = done.get(part, 0) + tensor.numel()
    return {part: round(done.get(part, 0) / n, 4) for part, n in total.items() if n}


def load_matching(model: nn.Module, source: str | Path) -> dict:
    """Copy into ``model`` every tensor of ``source`` whose name and shape match; return what happened, with the
    share of each part of the network that was loaded (``parts``).

    Raises CheckpointError (one line) when no major part of the network is covered (at least :data:`PART_COVERED`
    of its weights): a source of another architecture or width matches only a few small tensors by chance (counters,
    biases of equal size), which is a wrong source, not a partial start.
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
    parts = part_coverage(target, loaded)
    sizes = part_sizes(target)
    covered = sorted(p for p, share in parts.items() if share >= PART_COVERED and sizes[p] >= MAJOR_PART)
    if not covered:
        best = max(parts.items(), key=lambda item: item[1]) if parts else ("-", 0.0)
        raise CheckpointError(f"{weights}: no part of this model matches the source by name and shape (tensors "
                              f"matching: {len(loaded)} of {len(target)}; best part {best[0]} {best[1]:.0%}): "
                              "another architecture or width? nothing to start from")
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    missing = sorted(set(target) - set(loaded))
    return {
        "source": str(Path(source)),
        "weights": str(weights),
        # a shipped model's name or a run folder can hold other weights later: the hash says which were read
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "loaded": loaded,
        "skipped_from_source": skipped,
        "left_at_initialisation": missing,
        "parts": parts,
        "counts": {"loaded": len(loaded), "skipped_from_source": len(skipped),
                   "left_at_initialisation": len(missing), "model": len(target)},
    }


def summary_line(report: dict) -> str:
    """One line for the terminal: how much was loaded and which parts it covers."""
    parts = report["parts"]
    started = [f"{p} {share:.0%}" for p, share in parts.items() if share >= PART_COVERED]
    fresh = [p for p, share in parts.items() if share < PART_COVERED]
    c = report["counts"]
    return (f"started from {report['weights']}: {c['loaded']} of {c['model']} tensors loaded, covering "
            f"{', '.join(started)}" + (f"; at initialisation: {', '.join(fresh)}" if fresh else "")
            + (f"; {c['skipped_from_source']} source tensor(s) did not fit" if c["skipped_from_source"] else ""))


def write_report(run_dir: str | Path, report: dict) -> Path:
    return atomic_write_json(Path(run_dir) / REPORT_NAME, report)
