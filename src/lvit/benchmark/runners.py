"""Worker side: build a case's model and inputs, and the callables that run one inference or training step of
a variant (eager, channels_last, fold-bn, bf16, compile, fused Adam, ONNX)."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from ..models.fold import fold_batchnorm
from .tasks import Case, Task


def build_case(case: Case, device: str):
    import torch

    from ..export import example_inputs
    from ..models import LViTConfig, build_model

    cfg = LViTConfig.from_dict({**case.config, "dropout": 0.0})
    torch.manual_seed(0)
    model = build_model(case.model, cfg).to(device)
    image, text, text_mask = example_inputs(case.batch, cfg.image_size, cfg.in_channels, cfg.text_tokens,
                                            cfg.text_dim, seed=1)
    gen = torch.Generator().manual_seed(2)
    target = (torch.rand(case.batch, cfg.n_classes, cfg.image_size, cfg.image_size, generator=gen) > 0.7).float()
    return model, [t.to(device) for t in (image, text, text_mask, target)]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, enabled: bool):
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def inference_runner(task: Task, model, inputs):
    """Return ``(call() -> logits, setup_seconds)`` for an inference variant."""
    import torch

    image, text, text_mask, _ = inputs
    variant, device = task.variant, task.device
    model.eval()
    t0 = time.perf_counter()
    if variant == "onnx":
        if device != "cpu":
            raise RuntimeError("the onnx variant runs on CPU only here")
        from ..export import OnnxSegmenter, export_onnx

        tmp = tempfile.mkdtemp(prefix="lvit-bench-")
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, check=False)
        session = OnnxSegmenter(path, threads=torch.get_num_threads())

        def call():
            return session(image, text, text_mask)

        return call, time.perf_counter() - t0
    if variant == "channels_last":
        model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    if variant == "fold-bn":
        fold_batchnorm(model)
    fn = model
    if variant in ("compile", "compile-freeze"):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = variant == "compile-freeze"
        fn = torch.compile(model)
    use_bf16 = variant == "bf16"

    def call():
        with torch.inference_mode(), autocast(device, use_bf16):
            return fn(image, text, text_mask)

    return call, time.perf_counter() - t0


def training_runner(task: Task, model, inputs):
    """Return ``(step() -> loss, setup_seconds)`` for a training variant."""
    import torch
    import torch.nn.functional as F

    image, text, text_mask, target = inputs
    variant, device = task.variant, task.device
    model.train()
    t0 = time.perf_counter()
    if variant == "channels_last":
        model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    fused = "fused-adam" in variant
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused or None)
    fn = torch.compile(model) if variant.startswith("compile") else model
    use_bf16 = variant == "bf16"

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, use_bf16):
            logits = fn(image, text, text_mask)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, time.perf_counter() - t0
