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
from .tasks import Case, Steps, Task, uses_bf16, variant_steps


def build_case(case: Case, device: str):
    import torch

    from ..artifacts.export import example_inputs
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
        from ..artifacts.export import OnnxSegmenter, export_onnx

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
        fn = torch.compile(model, backend=task.compile_backend)
    use_bf16 = uses_bf16(variant)

    def call():
        with torch.inference_mode(), autocast(device, use_bf16):
            return fn(image, text, text_mask)

    return call, time.perf_counter() - t0


def blob_batch(case: Case, device: str, seed: int, batch: int | None = None):
    """A structured training batch (``image, text, text_mask, target``): discs of random centre and radius as the
    targets, images that show them (brighter, blurred, noisy), the case's random text. What the gradient checks
    and their warm-up train on: unlike random-noise targets, a network can learn it."""
    import torch
    import torch.nn.functional as F

    from ..artifacts.export import example_inputs
    from ..models import LViTConfig

    cfg = LViTConfig.from_dict({**case.config, "dropout": 0.0})
    b, s = batch or case.batch, cfg.image_size
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    centre = torch.randint(s // 4, 3 * s // 4, (b, 2), generator=gen)
    radius = torch.randint(max(1, s // 10), max(2, s // 4), (b,), generator=gen)
    target = (((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2)
              < radius[:, None, None] ** 2).float()[:, None]
    image = 0.4 + 0.3 * F.avg_pool2d(target, 5, 1, 2) + 0.1 * torch.randn(b, 1, s, s, generator=gen)
    image = image.clamp(0, 1).expand(-1, cfg.in_channels, -1, -1).contiguous()
    _, text, text_mask = example_inputs(b, s, cfg.in_channels, cfg.text_tokens, cfg.text_dim, seed=seed)
    return [t.to(device) for t in (image, text, text_mask, target)]


def warm_state(task: Task, steps: int, seed: int = 100, lr: float = 1e-3) -> dict:
    """Weights after ``steps`` eager fp32 Adam steps (learning rate ``lr``) on :func:`blob_batch` batches from the
    case's seeded initialisation (CPU copies). A gradient check at these weights measures the variant's
    arithmetic; at the random initialisation it measures how chaotic the untrained BatchNorm network is
    (docs/PERFORMANCE.md)."""
    import torch
    import torch.nn.functional as F

    model, _ = build_case(task.case, task.device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for i in range(steps):
        image, text, text_mask, target = blob_batch(task.case, task.device, seed + i)
        optimizer.zero_grad(set_to_none=True)
        F.binary_cross_entropy_with_logits(model(image, text, text_mask), target).backward()
        optimizer.step()
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def device_batches(case: Case, device: str, channels_last: bool, n_batches: int = 4):
    """An endless iterator of augmented batches from a :class:`~lvit.data.device.DeviceDataset` of
    ``n_batches x batch`` uint8 blob images (the ``+gpu-data`` variant: what ``lvit train`` does with
    ``fast.device_data``)."""
    import torch

    from ..data.device import DeviceAugmenter, DeviceDataset, DeviceLoader
    from ..data.transforms import AugmentConfig

    image, text, text_mask, target = blob_batch(case, "cpu", seed=999, batch=n_batches * case.batch)
    u8 = image[:, :1].mul(255).round().to(torch.uint8)
    data = DeviceDataset(u8.to(device), target.to(torch.uint8).to(device), in_channels=image.shape[1],
                         text_emb=text, text_mask=text_mask)
    loader = DeviceLoader(data, case.batch, shuffle=True, drop_last=True, augmenter=DeviceAugmenter(AugmentConfig()),
                          channels_last=channels_last)
    while True:
        yield from loader


def training_runner(task: Task, model, inputs, steps: Steps | None = None):
    """Return ``(step() -> loss, setup_seconds)`` for a training variant (``steps``: its :class:`Steps`, default
    those of ``task.variant``). Plain variants train on ``inputs`` with BCE; ``+gpu-data`` draws each batch from
    device-resident data and trains with the official Dice + BCE loss."""
    import torch
    import torch.nn.functional as F

    from ..train.fastpath import autocast_bf16, compile_module, make_adam, to_channels_last

    steps = steps or variant_steps(task.variant)
    image, text, text_mask, target = inputs
    device = task.device
    model.train()
    t0 = time.perf_counter()
    if steps.channels_last:
        to_channels_last(model)
        image = image.contiguous(memory_format=torch.channels_last)
    optimizer = make_adam(model.parameters(), 1e-4, fused=steps.fused)
    compile_module(model, steps.compile, task.compile_backend)
    batches = device_batches(task.case, device, steps.channels_last) if steps.gpu_data else None
    if batches is not None:
        from ..train.losses import DiceBCELoss

        loss_fn = DiceBCELoss()
        total = torch.zeros((), device=device)  # the epoch's loss, accumulated without a host sync

    def step():
        optimizer.zero_grad(set_to_none=True)
        if batches is None:
            with autocast_bf16(device, steps.bf16):
                logits = model(image, text, text_mask)
            loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        else:
            batch = next(batches)
            with autocast_bf16(device, steps.bf16):
                logits = model(batch["image"], batch["text"], batch["text_mask"])
            loss = loss_fn(logits, batch["mask"])
            total.add_(loss.detach())
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, time.perf_counter() - t0
