"""The pieces of the fast GPU training path that the trainer (``lvit.train.fast``) and the speed harness
(``lvit.benchmark``, variants ``bf16+channels_last`` ... ``+gpu-data``) share, so both time the same thing.

No Lightning here: the harness's worker processes import this without it.
"""

from __future__ import annotations

import torch
from torch import nn

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights (cuDNN's tensor-core convolutions want NHWC activations; inputs must follow)."""
    return model.to(memory_format=torch.channels_last)


def compile_module(model: nn.Module, mode: str = "default", backend: str = "inductor") -> nn.Module:
    """Compile ``model`` in place (``nn.Module.compile``: its state-dict keys do not change, so checkpoints stay
    plain). ``mode``: ``default``, ``reduce-overhead`` (inductor + CUDA graphs), ``max-autotune`` ...; ``none``
    leaves it eager. ``backend``: ``inductor``, or, to test the wiring where inductor's code generation is too
    slow (a 2-core CPU), ``aot_eager_decomp_partition`` (AOTAutograd with inductor's decompositions, run eagerly;
    plain ``aot_eager`` fails LViT's backward on the CPU with dropout on) or ``eager`` (Dynamo's capture only)."""
    if mode == "none":
        return model
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    kwargs = {"backend": backend, "dynamic": False}
    if backend == "inductor" and mode != "default":
        kwargs["mode"] = mode
    model.compile(**kwargs)
    return model


def make_adam(params, lr: float, *, weight_decay: float = 0.0, decoupled: bool = False,
              fused: bool = False) -> torch.optim.Optimizer:
    """Adam (or AdamW when ``decoupled``); ``fused=True``: one kernel for the whole update (CUDA, or CPU in
    recent torch); falls back to the default implementation where the build has no fused kernel."""
    klass = torch.optim.AdamW if decoupled else torch.optim.Adam
    params = list(params)
    if fused:
        try:
            return klass(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
            pass
    return klass(params, lr=lr, weight_decay=weight_decay)


def autocast_bf16(device: str | torch.device, enabled: bool = True):
    """``torch.autocast`` in bfloat16 on ``device``'s type (a no-op context when not ``enabled``)."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    kind = torch.device(device).type
    return torch.autocast(device_type="cuda" if kind == "cuda" else "cpu", dtype=torch.bfloat16)
