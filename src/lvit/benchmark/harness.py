"""Parent side: plan the tasks of a run, run each in its own worker process, collect and derive the figures."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tasks import FAST_PATH_VARIANTS, INFERENCE_VARIANTS, TRAINING_VARIANTS, Case, Task, synth_config, uses_bf16
from .worker import run_task


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
    compile_backend: str = "inductor"
    cases: tuple[str, ...] | None = None  # subset of CASE_KEYS (default: all)


#: Names of the full run's cases (``--cases``), in order: the default model with MiniLM text, with the paper's
#: 768-d text, the synth preset.
CASE_KEYS = ("default", "paper-text", "synth")


def plan(opts: Options) -> dict[str, Any]:
    """The cases and task lists of a run."""
    if opts.quick:
        tiny = {"image_size": 64, "base_channels": 16, "text_dim": 384, "vit_heads": 4}
        cases = [Case("tiny-64 (quick)", "lvit", tiny, batch=opts.batch or 2)]
        inf_variants = ("eager", "channels_last")
        # Named training variants join the quick run too (the GPU script's dry run: the fast path on a tiny model).
        train_variants = ("eager",) + tuple(v for v in TRAINING_VARIANTS if v != "eager" and opts.variants and (
            v in opts.variants or f"training:{v}" in opts.variants))
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
    if opts.cases:
        unknown = set(opts.cases) - set(CASE_KEYS)
        if unknown:
            raise ValueError(f"unknown case(s) {', '.join(sorted(unknown))} (known: {', '.join(CASE_KEYS)})")
        cases = [c for key, c in zip(CASE_KEYS, cases) if key in opts.cases]
    # --variants names variants for both modes ("onnx") or for one ("training:compile").
    inf = tuple(v for v in INFERENCE_VARIANTS
                if not opts.variants or v in opts.variants or f"inference:{v}" in opts.variants)
    # The fast GPU path's steps run by default on CUDA only (bf16 is a loss on a CPU without bf16 units, and
    # inductor compiles take minutes there); named in --variants they run anywhere.
    trn = tuple(v for v in TRAINING_VARIANTS
                if (not opts.variants and (v not in FAST_PATH_VARIANTS or opts.device.startswith("cuda")))
                or (opts.variants and (v in opts.variants or f"training:{v}" in opts.variants)))
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


def machine_line() -> str:
    """"CPU <name>, <n> cores, torch <version>, <k> thread(s)": the machine line of a bench script's records."""
    import torch

    return f"CPU {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


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
    common = dict(device=opts.device, warmup=p["warmup"], repeats=p["repeats"], threads=opts.threads,
                  compile_backend=opts.compile_backend)
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


def on_gpu(report: dict[str, Any]) -> bool:
    return str(report.get("options", {}).get("device", "cpu")).startswith("cuda")


def _derive(report: dict[str, Any]) -> None:
    """Ratios vs eager, MFU, and which variants are kept."""
    mm = report.get("matmul", {})
    peak = {"fp32": (mm.get("fp32") or {}).get("flops"), "bf16": (mm.get("bf16") or {}).get("flops")}
    if on_gpu(report):
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
                dtype_peak = peak["bf16"] if uses_bf16(variant) else peak["fp32"]
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
