"""Worker side: time a variant, check it against eager fp32, measure the matmul rate, the attention share and the
data loader; ``python -m lvit.benchmark TASK_JSON`` runs one task and prints its result line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..models.flops import count_flops
from .runners import blob_batch, build_case, inference_runner, peak_rss_mb, rss_mb, sync, training_runner, warm_state
from .tasks import BF16_BOUND, BF16_PROB_BOUND, FP32_BOUND, FP32_GRAD_BOUND, Steps, Task, uses_bf16, variant_steps


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
    compiles = variant_steps(task.variant).compile != "none" or task.variant == "onnx"
    first_limit = float("inf") if compiles else 3 * task.max_step_s
    first_t0 = time.perf_counter()
    try:
        with _deadline(first_limit):
            call()
            sync(task.device)
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
                sync(task.device)
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

    ref_model, inputs = build_case(task.case, task.device)
    ref_model.eval()
    with torch.inference_mode():
        ref = ref_model(*inputs[:3]).float()
    got = variant_logits.float().to(ref.device)
    scale = float(ref.abs().max()) or 1.0
    rel = float((got - ref).abs().max()) / scale
    prob = float((torch.sigmoid(got) - torch.sigmoid(ref)).abs().max())
    bf16 = uses_bf16(task.variant)
    bound = BF16_BOUND if bf16 else FP32_BOUND
    ok = rel <= bound and (not bf16 or prob <= BF16_PROB_BOUND)
    return {"rel_err": rel, "prob_err": prob, "bound": bound, "ok": ok}


def _gradient_probe(task: Task, steps: Steps):
    """``grads(state) -> (loss, gradients)``: one training step of the variant ``steps`` (one model, built and
    compiled once) from the weights ``state`` (None: the seeded initialisation) on a fixed :func:`blob_batch`
    (``+gpu-data``: the first batch its device data gives after ``torch.manual_seed(7)``)."""
    import torch

    model, _ = build_case(task.case, task.device)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step, _ = training_runner(task, model, blob_batch(task.case, task.device, seed=12345), steps)
    params = list(model.parameters())

    def grads(state):
        with torch.no_grad():
            for key, value in model.state_dict().items():  # in place: a compiled/graphed step keeps its buffers
                value.copy_((state or init)[key])
        torch.manual_seed(7)  # the +gpu-data batch (shuffle and augmentation) is the same on both sides
        loss = step()  # zeroes gradients first: afterwards .grad holds exactly this step's gradients
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in params])
        return float(loss), flat

    return grads


def _check_training(task: Task) -> dict[str, Any]:
    """One step's gradients of the variant against eager fp32 (same weights, same batch; ``+gpu-data`` against
    eager fp32 on the same device data and loss), after ``task.check_warmup`` fp32 steps on a structured task,
    and, for information, at the random initialisation."""
    steps = variant_steps(task.variant)
    reference = _gradient_probe(task, Steps(gpu_data=steps.gpu_data))
    variant = _gradient_probe(task, steps)
    bound = BF16_BOUND if steps.bf16 else FP32_GRAD_BOUND

    def compare(state):
        ref_loss, ref_grads = reference(state)
        loss, grads = variant(state)
        rel = float((grads - ref_grads).norm() / ref_grads.norm().clamp_min(1e-30))
        return rel, abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)

    init_rel, init_loss_rel = compare(None)
    out = {"bound": bound, "rel_err_init": init_rel, "loss_rel_err_init": init_loss_rel,
           "warmup_steps": task.check_warmup}
    if task.check_warmup > 0:
        rel, loss_rel = compare(warm_state(task, task.check_warmup))
    else:
        rel, loss_rel = init_rel, init_loss_rel
    out.update(rel_err=rel, loss_rel_err=loss_rel, ok=rel <= bound and loss_rel <= bound)
    return out


def measure_matmul(device: str, dtype_name: str, budget_s: float = 0.3, max_n: int = 4096) -> dict[str, Any]:
    """Best FLOP/s of a square matmul, growing n (256..max_n) until one product takes ``budget_s``."""
    import torch

    dtype = getattr(torch, dtype_name)
    best, n_used = 0.0, 0
    for n in (m for m in (256, 512, 1024, 2048, 4096, 8192) if m <= max_n):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.matmul(a, b)
        sync(device)
        rates, elapsed = [], []
        # Samples for about 0.15 s (3 to 50): a product of a few ms, preempted once on a busy machine, would
        # otherwise set a low peak and inflate every MFU measured against it.
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        samples = min(50, max(3, math.ceil(0.15 / max(time.perf_counter() - t0, 1e-6))))
        for _ in range(samples):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync(device)
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

    model, inputs = build_case(task.case, task.device)
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
    flops = count_flops(model, [t[:1] for t in inputs[:3]])
    return {
        "attention_time_share": attn / total if total else 0.0,
        "top_ops": [(k, t / total) for k, t in rows[:8]],
        "flops_per_image": flops.total,
        "attention_flops_per_image": flops.attention,
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

    from ..data import SegmentationDataset
    from ..data.layout import load_split
    from ..data.synthetic import generate_synthetic

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
    base_rss = rss_mb()
    model, inputs = build_case(task.case, task.device)
    if task.mode == "inference":
        call, setup = inference_runner(task, model, inputs)
    elif task.mode == "training":
        call, setup = training_runner(task, model, inputs)
    else:
        raise ValueError(f"unknown mode {task.mode!r}")
    timing = _time_steps(task, call)
    if not timing["times"]:  # cut off during its first step: a lower bound on its step time only
        result.update({"aborted": timing["aborted"], "min_step_s": timing["first_s"], "peak_rss_mb": peak_rss_mb()})
        return result
    stats = _summary(timing["times"])
    result.update(stats)
    result["images_per_s"] = task.case.batch / stats["median_s"]
    # Compile/export time: setup plus the first call's excess over a steady-state step.
    result["compile_s"] = setup + max(0.0, timing["first_s"] - stats["median_s"])
    result["aborted"] = timing["aborted"]
    result["base_rss_mb"] = base_rss
    result["peak_rss_mb"] = peak_rss_mb()  # read before the correctness check builds more models
    if task.device.startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if task.check and task.variant != "eager" and not timing["aborted"]:
        if task.mode == "inference":
            result["check"] = _check_inference(task, call())
        else:
            result["check"] = _check_training(task)
    if task.count_flops:
        cfg_model, inputs = build_case(dataclasses.replace(task.case, batch=1), task.device)
        flops = count_flops(cfg_model.eval(), inputs[:3])
        result["flops_per_image"] = {"total": flops.total, "attention": flops.attention}
    return result


def worker_main(argv: list[str]) -> int:
    task = Task.from_json(argv[0])
    try:
        result = run_task(task)
    except Exception as exc:  # reported to the parent, which records the variant as failed
        result = {"mode": task.mode, "variant": task.variant, "error": f"{type(exc).__name__}: {exc}"[:500]}
    print("LVIT_BENCH_RESULT " + json.dumps(result), flush=True)
    return 0
