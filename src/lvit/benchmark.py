"""Speed harness: images/s, peak memory and MFU of LViT, per speed-up variant, compared within one run.

What is measured (``run_benchmark``):

- **Variants** of inference (forward under ``torch.inference_mode``) and of a training step (forward, BCE loss,
  backward, Adam step): ``eager`` fp32 (the reference), ``channels_last``, ``bf16`` (autocast), ``compile``
  (``torch.compile``, inductor; compile time recorded), ``compile-freeze`` (inference: inductor with weight
  freezing, which folds BatchNorm into the convolutions and pre-packs weights), ``fused-adam`` (training:
  ``Adam(fused=True)``), ``onnx`` (inference in ONNX Runtime). Each is timed in its own subprocess, so its
  peak memory (``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on GPU) is its own.
- **Correctness** of every variant against eager fp32 on the same weights and inputs, as the relative error
  ``max|y - y_ref| / max|y_ref|`` of the logits (inference) and ``||g - g_ref|| / ||g_ref||`` of the
  gradients of one training step (BatchNorm in training mode). Bounds: ``FP32_BOUND`` for fp32 variants,
  ``BF16_BOUND`` for bf16 (which is also checked on probabilities). A variant that breaks its bound is
  reported as rejected whatever its speed.
- **MFU**: model FLOPs (``torch.utils.flop_counter``, plus SDPA, which the counter does not see on CPU) times
  images/s, over the machine's matmul rate measured in the same run with a large ``torch.matmul`` in the
  variant's dtype. Training counts 3x the forward FLOPs.
- **Timing**: warm-up steps, then ``repeats`` timed steps; median, inter-quartile range, min and max.
- **Scaling** of eager time and memory with image size and batch size, and the share of attention in the
  forward (profiler self time and FLOPs).

Models are built with ``dropout=0`` so that every variant computes the same function (dropout's cost is
a few element-wise ops on 196-token tensors, invisible next to the convolutions).

Run as ``lvit bench`` or ``python bench/speed.py``; the worker entry point is ``python -m lvit.benchmark``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

#: Max relative error of an fp32 variant's logits (``max|y - y_ref| / max|y_ref|``) and gradients (L2).
FP32_BOUND = 1e-4
FP32_GRAD_BOUND = 1e-2
#: bf16 keeps ~3 significant digits: looser bounds on logits/gradients, and max |p - p_ref| on probabilities.
BF16_BOUND = 5e-2
BF16_PROB_BOUND = 2e-2

INFERENCE_VARIANTS = ("eager", "channels_last", "fold-bn", "bf16", "compile", "compile-freeze", "onnx")
TRAINING_VARIANTS = ("eager", "channels_last", "bf16", "fused-adam", "compile")



# --------------------------------------------------------------------------------------------------------------
# What to run
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One model/input shape to benchmark."""

    label: str
    model: str = "lvit"
    config: dict[str, Any] = field(default_factory=dict)  # LViTConfig overrides
    batch: int = 2

    @property
    def image_size(self) -> int:
        return int(self.config.get("image_size", 224))


@dataclass
class Task:
    """One worker job: a case, a mode (``inference`` | ``training`` | ``profile`` | ``matmul``) and a variant."""

    case: Case | None
    mode: str
    variant: str = "eager"
    device: str = "cpu"
    warmup: int = 1
    repeats: int = 5
    threads: int = 0  # 0: torch's default
    check: bool = True
    count_flops: bool = False
    #: stop timing (and report it) once a step is this many seconds: a hopeless variant (bf16 on a CPU
    #: without bf16 units) must not eat the run.
    max_step_s: float = float("inf")
    matmul_max_n: int = 4096

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> Task:
        data = json.loads(text)
        case = Case(**data.pop("case")) if data.get("case") else None
        data.pop("case", None)
        return cls(case=case, **data)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and value == float("inf"):
        return 1e300
    return str(value)


def synth_config() -> tuple[dict[str, Any], str]:
    """The synth preset's model config (key ``model`` of the shipped preset) and where it came from."""
    import yaml

    from .models import LViTConfig
    from .presets import preset_path

    path = preset_path("synth")
    model = dict((yaml.safe_load(path.read_text()) or {}).get("model") or {})
    known = {f.name for f in dataclasses.fields(LViTConfig)}
    cfg = {k: v for k, v in model.items() if k in known}
    cfg.setdefault("text_dim", 384)  # the preset's MiniLM encoder
    return cfg, f"preset synth ({path.name})"


# --------------------------------------------------------------------------------------------------------------
# Worker side: runs in its own process
# --------------------------------------------------------------------------------------------------------------
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


def count_forward_flops(model, inputs) -> dict[str, float]:
    """Forward FLOPs of ``model(*inputs)`` (total and the attention part), per call."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_sdpa_flops_mapping())
    with torch.no_grad(), counter:
        model(*inputs)
    per_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for k, v in per_op.items() if "scaled_dot_product" in str(k))
    return {"total": float(counter.get_total_flops()), "attention": float(attention)}


def _build(case: Case, device: str):
    import torch

    from .export import example_inputs
    from .models import LViTConfig, build_model

    cfg = LViTConfig.from_dict({**case.config, "dropout": 0.0})
    torch.manual_seed(0)
    model = build_model(case.model, cfg).to(device)
    image, text, text_mask = example_inputs(case.batch, cfg.image_size, cfg.in_channels, cfg.text_tokens,
                                            cfg.text_dim, seed=1)
    gen = torch.Generator().manual_seed(2)
    target = (torch.rand(case.batch, cfg.n_classes, cfg.image_size, cfg.image_size, generator=gen) > 0.7).float()
    return model, [t.to(device) for t in (image, text, text_mask, target)]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str, enabled: bool):
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _inference_runner(task: Task, model, inputs):
    """Return ``(call() -> logits, setup_seconds)`` for an inference variant."""
    import torch

    image, text, text_mask, _ = inputs
    variant, device = task.variant, task.device
    model.eval()
    t0 = time.perf_counter()
    if variant == "onnx":
        if device != "cpu":
            raise RuntimeError("the onnx variant runs on CPU only here")
        from .export import OnnxSegmenter, export_onnx

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
        with torch.inference_mode(), _autocast(device, use_bf16):
            return fn(image, text, text_mask)

    return call, time.perf_counter() - t0


def fold_batchnorm(model):
    """Fold every eval-mode BatchNorm that directly follows a convolution into that convolution, in place.

    Works on modules that hold ``conv`` and ``norm`` children and apply them as ``norm(conv(x))`` (LViT's
    ConvBNReLU, Reconstruct and CTBN): the BatchNorm becomes ``nn.Identity``. The folded network computes the
    same function in eval mode (up to float rounding) with one pass over each activation less. Returns the
    number of folded pairs. Inference only: the folded model cannot be trained as the original.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model (it bakes in the running statistics)")
    folded = 0
    for module in model.modules():
        conv, norm = getattr(module, "conv", None), getattr(module, "norm", None)
        if isinstance(conv, (nn.Conv1d, nn.Conv2d)) and isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.conv = fuse_conv_bn_eval(conv, norm)
            module.norm = nn.Identity()
            folded += 1
    return folded


def _training_runner(task: Task, model, inputs):
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
        with _autocast(device, use_bf16):
            logits = fn(image, text, text_mask)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step, time.perf_counter() - t0


class _StepTooSlow(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise :class:`_StepTooSlow` in this (main) thread after ``seconds`` (checked between torch ops)."""
    import signal

    if not (0 < seconds < 1e9) or not hasattr(signal, "setitimer"):
        yield
        return

    def _expire(signum, frame):
        raise _StepTooSlow()

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _time_steps(task: Task, call: Callable[[], Any]) -> dict[str, Any]:
    """Warm up, then time ``task.repeats`` calls. The first call's extra time is the compile time.

    A variant whose step exceeds ``task.max_step_s`` (its first step: 3x that, unless it compiles) is cut off
    mid-step and reported as aborted: bf16 on a CPU without bf16 units would otherwise take many minutes.
    """
    compiles = task.variant.startswith("compile") or task.variant == "onnx"
    first_limit = float("inf") if compiles else 3 * task.max_step_s
    first_t0 = time.perf_counter()
    try:
        with _deadline(first_limit):
            call()
            _sync(task.device)
    except _StepTooSlow:
        return {"first_s": time.perf_counter() - first_t0, "times": [],
                "aborted": f"first step > {first_limit:.0f} s, stopped"}
    first = time.perf_counter() - first_t0
    times: list[float] = []
    aborted = None
    for i in range(max(0, task.warmup - 1) + task.repeats):
        t0 = time.perf_counter()
        try:
            with _deadline(task.max_step_s * 1.5):
                call()
                _sync(task.device)
        except _StepTooSlow:
            aborted = f"a step > {task.max_step_s * 1.5:.0f} s, stopped"
            break
        dt = time.perf_counter() - t0
        if i >= task.warmup - 1:
            times.append(dt)
        if dt > task.max_step_s:
            aborted = f"a step took {dt:.1f} s (limit {task.max_step_s:.1f} s)"
            break
    return {"first_s": first, "times": times, "aborted": aborted}


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    if len(ordered) >= 4:
        q = statistics.quantiles(ordered, n=4)
        q1, q3 = q[0], q[2]
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {"median_s": statistics.median(ordered), "q1_s": q1, "q3_s": q3, "min_s": ordered[0],
            "max_s": ordered[-1], "n": len(ordered)}


def _check_inference(task: Task, variant_logits) -> dict[str, Any]:
    import torch

    ref_model, inputs = _build(task.case, task.device)
    ref_model.eval()
    with torch.inference_mode():
        ref = ref_model(*inputs[:3]).float()
    got = variant_logits.float().to(ref.device)
    scale = float(ref.abs().max()) or 1.0
    rel = float((got - ref).abs().max()) / scale
    prob = float((torch.sigmoid(got) - torch.sigmoid(ref)).abs().max())
    bf16 = task.variant == "bf16"
    bound = BF16_BOUND if bf16 else FP32_BOUND
    ok = rel <= bound and (not bf16 or prob <= BF16_PROB_BOUND)
    return {"rel_err": rel, "prob_err": prob, "bound": bound, "ok": ok}


def _grads_of_one_step(task: Task, variant: str):
    import torch

    model, inputs = _build(task.case, task.device)
    step, _ = _training_runner(dataclasses.replace(task, variant=variant), model, inputs)
    params = list(model.parameters())
    loss = step()  # the step zeroes gradients first, so after it .grad holds exactly this step's gradients
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params])
    return float(loss), grads


def _check_training(task: Task) -> dict[str, Any]:
    ref_loss, ref_grads = _grads_of_one_step(task, "eager")
    loss, grads = _grads_of_one_step(task, task.variant)
    rel = float((grads - ref_grads).norm() / ref_grads.norm().clamp_min(1e-30))
    loss_rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    bound = BF16_BOUND if task.variant == "bf16" else FP32_GRAD_BOUND
    return {"rel_err": rel, "loss_rel_err": loss_rel, "bound": bound, "ok": rel <= bound and loss_rel <= bound}


def measure_matmul(device: str, dtype_name: str, budget_s: float = 0.3, max_n: int = 4096) -> dict[str, Any]:
    """Best FLOP/s of a square matmul, growing n (256..max_n) until one product takes ``budget_s``."""
    import torch

    dtype = getattr(torch, dtype_name)
    best, n_used = 0.0, 0
    for n in (m for m in (256, 512, 1024, 2048, 4096, 8192) if m <= max_n):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.matmul(a, b)
        _sync(device)
        rates, elapsed = [], []
        for _ in range(3 if device == "cpu" else 10):  # a GPU product takes ~1 ms: more samples, same cost
            t0 = time.perf_counter()
            torch.matmul(a, b)
            _sync(device)
            dt = time.perf_counter() - t0
            elapsed.append(dt)
            rates.append(2 * n**3 / dt)
        best, n_used = max(rates), n
        if min(elapsed) > budget_s:
            break
    return {"dtype": dtype_name, "flops": best, "n": n_used}


def attention_profile(task: Task) -> dict[str, Any]:
    """Share of the eager forward spent in attention: profiler self time, and FLOPs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    model, inputs = _build(task.case, task.device)
    model.eval()
    with torch.inference_mode():
        model(*inputs[:3])
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if task.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            model(*inputs[:3])
    rows = []
    total = 0.0
    for evt in prof.key_averages():
        total += evt.self_cpu_time_total
        rows.append((evt.key, evt.self_cpu_time_total))
    rows.sort(key=lambda r: -r[1])
    attn = sum(t for k, t in rows if "scaled_dot_product" in k or "softmax" in k)
    flops = count_forward_flops(model, [t[:1] for t in inputs[:3]])
    return {
        "attention_time_share": attn / total if total else 0.0,
        "top_ops": [(k, t / total) for k, t in rows[:8]],
        "flops_per_image": flops["total"],
        "attention_flops_per_image": flops["attention"],
    }


def measure_dataloader(image_size: int = 128, batch: int = 8, n_images: int = 48,
                       settings: tuple[tuple[int, bool], ...] = ((0, False), (0, True), (2, False), (2, True)),
                       epochs: int = 2) -> list[dict[str, Any]]:
    """Images/s of the training DataLoader on a synthetic dataset, per (workers, cache decoded images).

    Generates ``n_images`` synthetic radiographs (PNG, official layout) in a temporary folder and iterates
    ``SegmentationDataset`` (augmentation on, as the synth preset) through a ``DataLoader`` for ``epochs``
    epochs (workers persistent across epochs); reports the first epoch and the steady (last) epoch.
    """
    import shutil

    import torch
    from torch.utils.data import DataLoader

    from .data import SegmentationDataset
    from .data.layout import load_split
    from .data.synthetic import generate_synthetic

    root = Path(tempfile.mkdtemp(prefix="lvit-dl-bench-"))
    try:
        generate_synthetic(root / "synth", n_train=n_images, n_val=2, n_test=2, size=224, seed=0, progress=False)
        records = load_split(root / "synth", "train")
        gen = torch.Generator().manual_seed(0)
        text = torch.randn(len(records), 10, 384, generator=gen)
        rows = []
        for workers, cache in settings:
            dataset = SegmentationDataset(records, image_size, text, None, augment=False,
                                          cache_in_memory=cache)
            loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
            per_epoch = []
            for _ in range(epochs):
                t0 = time.perf_counter()
                seen = sum(b["image"].shape[0] for b in loader)
                per_epoch.append(seen / (time.perf_counter() - t0))
            rows.append({"workers": workers, "cache": cache, "first_epoch_images_per_s": per_epoch[0],
                         "steady_images_per_s": per_epoch[-1], "n_images": len(records), "batch": batch,
                         "image_size": image_size})
            del loader
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_task(task: Task) -> dict[str, Any]:
    """Run one worker job in this process and return its JSON-able result."""
    import torch

    if task.threads:
        torch.set_num_threads(task.threads)
    if task.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    result: dict[str, Any] = {"mode": task.mode, "variant": task.variant, "threads": torch.get_num_threads()}
    if task.mode == "matmul":
        result["fp32"] = measure_matmul(task.device, "float32", max_n=task.matmul_max_n)
        result["bf16"] = measure_matmul(task.device, "bfloat16", max_n=task.matmul_max_n)
        return result
    if task.mode == "profile":
        result.update(attention_profile(task))
        return result
    if task.mode == "dataloader":
        result["rows"] = measure_dataloader(task.case.image_size, task.case.batch)
        return result
    if task.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    model, inputs = _build(task.case, task.device)
    if task.mode == "inference":
        call, setup = _inference_runner(task, model, inputs)
    elif task.mode == "training":
        call, setup = _training_runner(task, model, inputs)
    else:
        raise ValueError(f"unknown mode {task.mode!r}")
    timing = _time_steps(task, call)
    if not timing["times"]:  # cut off during its first step: a lower bound on its step time only
        result.update({"aborted": timing["aborted"], "min_step_s": timing["first_s"], "peak_rss_mb": _peak_rss_mb()})
        return result
    stats = _summary(timing["times"])
    result.update(stats)
    result["images_per_s"] = task.case.batch / stats["median_s"]
    # Compile/export time: setup plus the first call's excess over a steady-state step.
    result["compile_s"] = setup + max(0.0, timing["first_s"] - stats["median_s"])
    result["aborted"] = timing["aborted"]
    result["base_rss_mb"] = base_rss
    result["peak_rss_mb"] = _peak_rss_mb()  # read before the correctness check builds more models
    if task.device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if task.check and task.variant != "eager" and not timing["aborted"]:
        if task.mode == "inference":
            result["check"] = _check_inference(task, call())
        else:
            result["check"] = _check_training(task)
    if task.count_flops:
        cfg_model, inputs = _build(dataclasses.replace(task.case, batch=1), task.device)
        result["flops_per_image"] = count_forward_flops(cfg_model.eval(), inputs[:3])
    return result


def _worker_main(argv: list[str]) -> int:
    task = Task.from_json(argv[0])
    try:
        result = run_task(task)
    except Exception as exc:  # reported to the parent, which records the variant as failed
        result = {"mode": task.mode, "variant": task.variant, "error": f"{type(exc).__name__}: {exc}"[:500]}
    print("LVIT_BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------------
# Parent side: plan, spawn workers, compare, render
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Options:
    quick: bool = False
    device: str = "cpu"
    batch: int | None = None
    sizes: tuple[int, ...] = (224, 320, 448)
    batches: tuple[int, ...] = (1, 2, 4)
    repeats: int | None = None
    warmup: int | None = None
    threads: int = 0
    variants: tuple[str, ...] | None = None  # restrict variants (both modes)
    scaling: bool = True
    dataloader: bool = True
    timeout_s: float = 1800.0
    repo_root: Path | None = None


def plan(opts: Options) -> dict[str, Any]:
    """The cases and task lists of a run."""
    if opts.quick:
        tiny = {"image_size": 64, "base_channels": 16, "text_dim": 384, "vit_heads": 4}
        cases = [Case("tiny-64 (quick)", "lvit", tiny, batch=opts.batch or 2)]
        inf_variants = ("eager", "channels_last")
        train_variants = ("eager",)
        return {"cases": cases, "full_variants": [cases[0].label], "inference": inf_variants,
                "training": train_variants, "repeats": opts.repeats or 3, "warmup": opts.warmup or 1,
                "scaling_sizes": (), "scaling_batches": (), "synth_source": None}
    batch = opts.batch or (24 if opts.device.startswith("cuda") else 2)
    synth_cfg, synth_source = synth_config()
    cases = [
        Case("default-224, MiniLM text (D=384)", "lvit", {"image_size": 224, "text_dim": 384}, batch),
        Case("default-224, paper text (D=768)", "lvit", {"image_size": 224, "text_dim": 768}, batch),
        Case(f"synth preset ({synth_cfg.get('image_size', 224)} px)", "lvit", synth_cfg, batch),
    ]
    # --variants names variants for both modes ("onnx") or for one ("training:compile").
    inf = tuple(v for v in INFERENCE_VARIANTS
                if not opts.variants or v in opts.variants or f"inference:{v}" in opts.variants)
    trn = tuple(v for v in TRAINING_VARIANTS
                if not opts.variants or v in opts.variants or f"training:{v}" in opts.variants)
    if opts.device.startswith("cuda"):
        inf = tuple(v for v in inf if v != "onnx")
    return {"cases": cases, "full_variants": [cases[0].label], "inference": inf, "training": trn,
            "repeats": opts.repeats or 5, "warmup": opts.warmup or 2,
            "scaling_sizes": opts.sizes if opts.scaling else (),
            "scaling_batches": opts.batches if opts.scaling else (), "synth_source": synth_source}


def run_in_process(task: Task) -> dict[str, Any]:
    """Run ``task`` here (quick mode: no interpreter start-up per variant; peak RSS is then the process's)."""
    try:
        return run_task(task)
    except Exception as exc:
        return {"mode": task.mode, "variant": task.variant, "error": f"{type(exc).__name__}: {exc}"[:500]}


def _spawn_process(task: Task, timeout_s: float) -> dict[str, Any]:
    """Run ``task`` in a fresh Python process (its own peak memory) and parse its result line."""
    cmd = [sys.executable, "-m", "lvit.benchmark", task.to_json()]
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "lvit-inductor-cache"))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"mode": task.mode, "variant": task.variant, "error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("LVIT_BENCH_RESULT "):
            return json.loads(line[len("LVIT_BENCH_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"mode": task.mode, "variant": task.variant, "error": f"worker exited {proc.returncode}: {tail[0][:300]}"}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform`` where that is missing), for benchmark records."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def machine_info() -> dict[str, Any]:
    import torch

    model_name = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "absent"
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {"cpu": model_name, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "versions": versions,
            "load_before": load, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_benchmark(opts: Options, command: str = "lvit bench", progress: bool = True) -> dict[str, Any]:
    """Run the whole plan; return a report dict (``render_markdown`` turns it into RESULTS.md text)."""
    from tqdm.auto import tqdm

    p = plan(opts)
    jobs: list[tuple[str, Any]] = [("matmul", None)]
    for case in p["cases"]:
        full = case.label in p["full_variants"]
        for mode in ("inference", "training"):
            # The other cases get eager and the export path only: compiles take minutes each on this CPU.
            variants = p[mode] if full else tuple(v for v in p[mode] if v in ("eager", "onnx"))
            for variant in variants:
                jobs.append(("variant", (case, mode, variant)))
    scaling_cases = []
    if p["scaling_sizes"]:
        base = p["cases"][0]
        for size in p["scaling_sizes"]:
            scaling_cases.append(Case(f"size {size}", base.model, {**base.config, "image_size": size}, base.batch))
        for b in p["scaling_batches"]:
            if b != base.batch:
                scaling_cases.append(Case(f"batch {b}", base.model, {**base.config, "image_size": 224}, b))
        for case in scaling_cases:
            jobs.append(("scaling", case))
        for size in p["scaling_sizes"]:
            jobs.append(("profile", Case(f"size {size}", base.model, {**base.config, "image_size": size}, 1)))

    if not opts.quick and opts.dataloader:
        synth = p["cases"][-1]
        jobs.append(("dataloader", Case("synth data", synth.model, synth.config, batch=8)))

    started = time.time()
    report: dict[str, Any] = {"machine": machine_info(), "command": command, "options": dataclasses.asdict(opts),
                              "synth_source": p["synth_source"], "cases": {}, "scaling": [], "profile": [],
                              "repeats": p["repeats"], "warmup": p["warmup"]}
    report["options"]["repo_root"] = str(opts.repo_root) if opts.repo_root else None
    common = dict(device=opts.device, warmup=p["warmup"], repeats=p["repeats"], threads=opts.threads)
    eager_step: dict[tuple[str, str], float] = {}
    isolate = not opts.quick

    def spawn(task: Task, timeout_s: float) -> dict[str, Any]:  # noqa: F811 - picks the execution mode
        return _spawn_process(task, timeout_s) if isolate else run_in_process(task)

    bar = tqdm(jobs, desc="lvit bench", unit="job", disable=not progress)
    for kind, payload in bar:
        if kind == "matmul":
            bar.set_postfix_str("matmul peak")
            report["matmul"] = spawn(Task(None, "matmul", matmul_max_n=512 if opts.quick else
                                          (8192 if opts.device.startswith("cuda") else 4096), **common),
                                     opts.timeout_s)
        elif kind == "variant":
            case, mode, variant = payload
            bar.set_postfix_str(f"{mode} {variant}")
            eager = eager_step.get((case.label, mode))
            # A variant 2x slower than eager is not worth timing; the 2 s floor keeps scheduling noise on
            # millisecond steps (quick mode, a loaded machine) from cutting off a variant that is fine.
            limit = max(2 * eager, 2.0) if eager else float("inf")
            res = spawn(Task(case, mode, variant, count_flops=(variant == "eager" and mode == "inference"),
                             max_step_s=limit, **common), opts.timeout_s)
            if variant == "eager" and "median_s" in res:
                eager_step[(case.label, mode)] = res["median_s"]
            entry = report["cases"].setdefault(case.label, {"case": dataclasses.asdict(case), "inference": {},
                                                            "training": {}})
            entry[mode][variant] = res
        elif kind == "scaling":
            case = payload
            bar.set_postfix_str(f"scaling {case.label}")
            row = {"label": case.label, "image_size": case.image_size, "batch": case.batch}
            for mode in ("inference", "training"):
                row[mode] = spawn(Task(case, mode, "eager", check=False, count_flops=False,
                                       **{**common, "repeats": max(2, p["repeats"] // 2), "warmup": 1}),
                                  opts.timeout_s)
            report["scaling"].append(row)
        elif kind == "profile":
            case = payload
            bar.set_postfix_str(f"profile {case.label}")
            res = spawn(Task(case, "profile", **common), opts.timeout_s)
            res["image_size"] = case.image_size
            report["profile"].append(res)
        elif kind == "dataloader":
            bar.set_postfix_str("dataloader")
            report["dataloader"] = spawn(Task(payload, "dataloader", **common), opts.timeout_s)
    bar.close()
    report["elapsed_s"] = time.time() - started
    try:
        report["load_after"] = os.getloadavg()
    except OSError:
        report["load_after"] = None
    _derive(report)
    return report


def _on_gpu(report: dict[str, Any]) -> bool:
    return str(report.get("options", {}).get("device", "cpu")).startswith("cuda")


def _derive(report: dict[str, Any]) -> None:
    """Ratios vs eager, MFU, and which variants are kept."""
    mm = report.get("matmul", {})
    peak = {"fp32": (mm.get("fp32") or {}).get("flops"), "bf16": (mm.get("bf16") or {}).get("flops")}
    if _on_gpu(report):
        # cuDNN runs "fp32" convolutions in TF32 on tensor cores by default, so a strict-fp32 matmul rate is
        # no ceiling there (MFU came out > 100%); every variant is measured against the bf16 tensor-core rate.
        peak["fp32"] = peak["bf16"]
    for entry in report["cases"].values():
        flops = (entry["inference"].get("eager") or {}).get("flops_per_image", {}).get("total")
        entry["flops_per_image"] = flops
        for mode, factor in (("inference", 1), ("training", 3)):
            eager = entry[mode].get("eager") or {}
            for variant, res in entry[mode].items():
                if "median_s" not in res:
                    continue
                if eager.get("median_s"):
                    res["speedup"] = eager["median_s"] / res["median_s"]
                dtype_peak = peak["bf16"] if variant == "bf16" else peak["fp32"]
                if flops and dtype_peak:
                    res["achieved_flops"] = factor * flops * res["images_per_s"]
                    res["mfu"] = res["achieved_flops"] / dtype_peak
                check_ok = variant == "eager" or (res.get("check") or {}).get("ok", False)
                res["kept"] = bool(variant != "eager" and check_ok and not res.get("aborted")
                                   and res.get("speedup", 0) > 1.05)
    for row in report["scaling"]:
        inf = row["inference"]
        if "median_s" in inf:
            row["inference_ms_per_image"] = 1000 * inf["median_s"] / row["batch"]


# --------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".3g", dash: str = "-") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return dash
    return format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    v = m["versions"]
    lines = [
        f"Command: `{report['command']}` (took {report['elapsed_s'] / 60:.1f} min)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
        f"ISA {m['capability']}; load average before {', '.join(f'{x:.2f}' for x in m['load_before'])}"
        + (f", after {', '.join(f'{x:.2f}' for x in report['load_after'])}" if report.get("load_after") else "")
        + ".",
        f"Versions: Python {v['python']}, torch {v['torch']}, onnx {v['onnx']}, onnxruntime {v['onnxruntime']}, "
        f"onnxscript {v['onnxscript']}.",
        "GPU: " + (m["gpu"] or "none on this machine") + " (this is a CPU run; a GPU run writes the section "
        "'Speed on GPU')." if report["options"]["device"] == "cpu"
        else f"GPU: {m['gpu']}",
        "",
    ]
    mm = report.get("matmul", {})
    if "fp32" in mm:
        lines.append(f"Measured matmul peak (same run): fp32 {mm['fp32']['flops'] / 1e9:.1f} GFLOP/s "
                     f"(n={mm['fp32']['n']}), bf16 {mm['bf16']['flops'] / 1e9:.2f} GFLOP/s (n={mm['bf16']['n']}).")
    elif "error" in mm:
        lines.append(f"Matmul peak: failed ({mm['error']}).")
    lines += [
        "",
        f"Timing: {report['warmup']} warm-up step(s), then {report['repeats']} timed steps per variant, each variant "
        "in its own process; images/s from the median step; spread = IQR (min-max when < 4 steps). "
        "Speed-up = eager median / variant median (same run). "
        + ("MFU = FLOPs x images/s / the measured bf16 matmul peak, for every variant (cuDNN runs fp32 "
           "convolutions in TF32 on the tensor cores; training = 3x forward FLOPs). Peak memory = "
           "torch.cuda.max_memory_allocated." if _on_gpu(report) else
           "MFU = FLOPs x images/s / measured matmul peak of the variant's dtype (training = 3x forward "
           "FLOPs). Peak memory = process peak RSS."),
        f"Correctness vs eager fp32 on the same weights: fp32 variants max|dy|/max|y| <= {FP32_BOUND:g} "
        f"(logits) and ||dg||/||g|| <= {FP32_GRAD_BOUND:g} (gradients of one step); bf16 <= {BF16_BOUND:g} and "
        f"max|dp| <= {BF16_PROB_BOUND:g} on probabilities. Kept = passes its bound and is > 1.05x faster.",
        "",
    ]
    for label, entry in report["cases"].items():
        case = entry["case"]
        flops = entry.get("flops_per_image")
        lines.append(f"#### {label} — batch {case['batch']}, config {json.dumps(case['config'], sort_keys=True)}")
        lines.append("")
        if flops:
            lines.append(f"Forward: {flops / 1e9:.2f} GFLOPs per image.")
            lines.append("")
        mem_label = "peak GPU memory (MB)" if _on_gpu(report) else "peak RSS (MB)"
        lines.append(f"| mode | variant | images/s | step median (s) | spread (s) | speed-up | MFU | {mem_label} "
                     "| compile/export (s) | max rel err (bound) | kept |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for mode in ("inference", "training"):
            for variant, res in sorted(entry[mode].items(), key=lambda kv: kv[0] != "eager"):  # eager first
                if "error" in res:
                    lines.append(f"| {mode} | {variant} | failed: {res['error'][:120]} | | | | | | | | no |")
                    continue
                if "median_s" not in res:
                    eager_s = (entry[mode].get("eager") or {}).get("median_s")
                    slower = f" (> {res['min_step_s'] / eager_s:.1f}x eager's step)" if eager_s else ""
                    lines.append(f"| {mode} | {variant} | - | > {res['min_step_s']:.3g} | | "
                                 f"< {eager_s / res['min_step_s']:.2f}x | | | | not checked | no: {res['aborted']}"
                                 f"{slower} |" if eager_s else
                                 f"| {mode} | {variant} | - | > {res['min_step_s']:.3g} | | | | | | | no |")
                    continue
                check = res.get("check") or {}
                err = "reference" if variant == "eager" else (
                    f"{_fmt(check.get('rel_err'), '.1e')} ({_fmt(check.get('bound'), 'g')})" if check else "-")
                if variant == "bf16" and "prob_err" in check:
                    err += f"; prob {check['prob_err']:.1e}"
                spread = (f"{res['q1_s']:.3g}-{res['q3_s']:.3g}" if res["n"] >= 4
                          else f"{res['min_s']:.3g}-{res['max_s']:.3g}")
                kept = "ref" if variant == "eager" else ("yes" if res.get("kept") else "no")
                if res.get("aborted"):
                    kept = f"no ({res['aborted']})"
                mem = res.get("peak_gpu_mb", res.get("peak_rss_mb"))
                compile_s = res.get("compile_s") if variant not in ("eager", "channels_last", "bf16",
                                                                    "fused-adam") else None
                lines.append(
                    f"| {mode} | {variant} | {res['images_per_s']:.3g} | {res['median_s']:.3g} | {spread} "
                    f"| {_fmt(res.get('speedup'), '.2f')}x | {_fmt(100 * res['mfu'] if 'mfu' in res else None, '.1f')}% "
                    f"| {_fmt(mem, '.0f')} | {_fmt(compile_s, '.1f')} | {err} | {kept} |")
        lines.append("")
    if report["scaling"]:
        lines += ["#### Scaling (eager fp32)", "",
                  "| setting | image | batch | inference s/step | ms/image | inference peak RSS (MB) "
                  "| training s/step | training peak RSS (MB) |", "|---|---|---|---|---|---|---|---|"]
        for row in report["scaling"]:
            inf, trn = row["inference"], row["training"]
            lines.append(
                f"| {row['label']} | {row['image_size']} | {row['batch']} | {_fmt(inf.get('median_s'))} "
                f"| {_fmt(row.get('inference_ms_per_image'), '.0f')} | {_fmt(inf.get('peak_rss_mb'), '.0f')} "
                f"| {_fmt(trn.get('median_s'))} | {_fmt(trn.get('peak_rss_mb'), '.0f')} |")
        lines.append("")
    if report["profile"]:
        lines += ["#### Attention share of the eager forward (batch 1)", "",
                  "| image | tokens/level | GFLOPs/image | attention FLOPs share | attention time share (profiler) "
                  "| top ops by self time |", "|---|---|---|---|---|---|"]
        for row in report["profile"]:
            if "error" in row:
                lines.append(f"| {row['image_size']} | failed: {row['error'][:100]} | | | | |")
                continue
            tokens = (row["image_size"] // 16) ** 2
            top = ", ".join(f"{k.replace('aten::', '')} {100 * s:.0f}%" for k, s in row["top_ops"][:4])
            lines.append(
                f"| {row['image_size']} | {tokens} | {row['flops_per_image'] / 1e9:.1f} "
                f"| {100 * row['attention_flops_per_image'] / row['flops_per_image']:.2f}% "
                f"| {100 * row['attention_time_share']:.2f}% | {top} |")
        lines.append("")
        crossover = attention_crossover(report["profile"])
        if crossover:
            lines.append(crossover)
            lines.append("")
    lines += render_dataloader(report)
    return "\n".join(lines)


def render_dataloader(report: dict[str, Any]) -> list[str]:
    """The data-loading table, compared with the synth preset's eager training step."""
    dl = report.get("dataloader")
    if not dl:
        return []
    if "error" in dl:
        return [f"Data loading: failed ({dl['error']}).", ""]
    rows = dl["rows"]
    synth = [e for label, e in report["cases"].items() if label.startswith("synth")]
    step = None
    if synth:
        train = synth[0]["training"].get("eager") or {}
        step = train.get("images_per_s")
    lines = [f"#### Data loading (synthetic PNGs, {rows[0]['image_size']} px, batch {rows[0]['batch']}, "
             f"{rows[0]['n_images']} images, 2 epochs)", ""]
    if step:
        lines.append(f"The model consumes {step:.3g} images/s in training (synth preset, eager, same run): the "
                     "loader starves it only below that rate.")
        lines.append("")
    lines += ["| workers | cache decoded images | first epoch images/s | steady images/s | x model need |",
              "|---|---|---|---|---|"]
    for r in rows:
        need = f"{r['steady_images_per_s'] / step:.1f}x" if step else "-"
        lines.append(f"| {r['workers']} | {'yes' if r['cache'] else 'no'} | {r['first_epoch_images_per_s']:.0f} "
                     f"| {r['steady_images_per_s']:.0f} | {need} |")
    lines.append("")
    return lines


def attention_crossover(profile_rows: list[dict[str, Any]]) -> str | None:
    """Extrapolate where attention FLOPs would equal the rest: attention grows as S^4, the rest as S^2."""
    rows = [r for r in profile_rows if "flops_per_image" in r and r["attention_flops_per_image"] > 0]
    if not rows:
        return None
    r = rows[-1]
    s = r["image_size"]
    attn, rest = r["attention_flops_per_image"], r["flops_per_image"] - r["attention_flops_per_image"]
    # attn(S) = attn * (S/s)^4, rest(S) = rest * (S/s)^2 -> equal at S = s * sqrt(rest/attn)
    cross = s * (rest / attn) ** 0.5
    return (f"Attention FLOPs grow with the 4th power of the image side (tokens = (S/16)^2, cost ~ tokens^2), "
            f"the convolutions with the 2nd: extrapolating from {s} px, attention would match the rest of the "
            f"network at about {cross:.0f} px ({(cross / 16) ** 2:.0f} tokens per level); below that the "
            "convolutions dominate.")


SPEED_START, SPEED_END = "<!-- speed:start -->", "<!-- speed:end -->"


def write_speed_section(results_path: Path, body: str, gpu: bool = False) -> Path:
    """Replace (or append) the Speed section between the markers in RESULTS.md, atomically. A GPU run has its
    own section ("speed-gpu", heading "Speed on GPU"), so it never replaces the CPU figures."""
    from .io import write_marked_section

    return write_marked_section(results_path, "speed-gpu" if gpu else "speed",
                                f"## Speed{' on GPU' if gpu else ''}\n\n{body.rstrip()}")


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
