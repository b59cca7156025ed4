"""Forward FLOPs of a model (a multiply-add = 2 FLOPs): the one counter behind ``lvit model-info`` and the speed
harness's MFU, on real or meta tensors."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FlopCount:
    total: float  # FLOPs of one call
    attention: float  # the part spent in attention (fused SDPA, or its batched matmuls)
    by_module: dict[str, float] = field(default_factory=dict)  # module path (as named_modules) -> FLOPs


def _sdpa_flops_mapping() -> dict:
    """FlopCounterMode has no formula for the CPU flash-attention op SDPA dispatches to: add it."""
    import torch
    from torch.utils import flop_counter as fc

    mapping = {}
    aten = torch.ops.aten
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(aten, name, None)
        if op is None:
            continue

        def forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            # FlopCounterMode hands formulas the input shapes, not the tensors.
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

        mapping[op] = forward_flops
    return mapping


def count_flops(model, inputs) -> FlopCount:
    """FLOPs of ``model(*inputs)`` under ``torch.no_grad``: total, attention, and per module (modules that
    never run themselves, such as ModuleList containers, have no entry). Meta-device tensors work (shapes
    only); there attention runs as batched matmuls, which count the same."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_sdpa_flops_mapping())
    with torch.no_grad(), counter:
        model(*inputs)
    counts = counter.get_flop_counts()
    per_op = counts.get("Global", {})
    attention = sum(v for k, v in per_op.items() if "scaled_dot_product" in str(k) or str(k).endswith(".bmm"))
    root = type(model).__name__
    by_module = {key[len(root) + 1:]: float(sum(ops.values())) for key, ops in counts.items()
                 if key.startswith(root + ".")}
    return FlopCount(float(sum(per_op.values())), float(attention), by_module)
