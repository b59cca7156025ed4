"""The Markdown of a speed report (the "Speed" sections of bench/RESULTS.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .harness import on_gpu
from .tasks import BF16_BOUND, BF16_PROB_BOUND, FP32_BOUND, FP32_GRAD_BOUND, Task, variant_steps


def _fmt(value: Any, spec: str = ".3g", dash: str = "-") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return dash
    return format(value, spec)


def _warmup_steps(report: dict[str, Any]) -> int:
    for entry in report.get("cases", {}).values():
        for res in entry.get("training", {}).values():
            if "warmup_steps" in (res.get("check") or {}):
                return int(res["check"]["warmup_steps"])
    return Task(None, "training").check_warmup


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
           "torch.cuda.max_memory_allocated." if on_gpu(report) else
           "MFU = FLOPs x images/s / measured matmul peak of the variant's dtype (training = 3x forward "
           "FLOPs). Peak memory = process peak RSS."),
        f"Correctness vs eager fp32 on the same weights: fp32 variants max|dy|/max|y| <= {FP32_BOUND:g} "
        f"(logits) and ||dg||/||g|| <= {FP32_GRAD_BOUND:g} (gradients of one step); bf16 <= {BF16_BOUND:g} and "
        f"max|dp| <= {BF16_PROB_BOUND:g} on probabilities (bf16 = every variant computing in bf16: bf16, "
        "bf16+channels_last and the fast-path steps after it). Training gradients are compared after "
        f"{_warmup_steps(report)} fp32 steps on a structured task ('at init': at the random initialisation, where "
        "the untrained BatchNorm network is chaotic; docs/PERFORMANCE.md). Kept = passes its bound and is > 1.05x "
        "faster.",
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
        mem_label = "peak GPU memory (MB)" if on_gpu(report) else "peak RSS (MB)"
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
                if "rel_err_init" in check and check.get("warmup_steps"):
                    err += f"; at init {check['rel_err_init']:.1e}"
                spread = (f"{res['q1_s']:.3g}-{res['q3_s']:.3g}" if res["n"] >= 4
                          else f"{res['min_s']:.3g}-{res['max_s']:.3g}")
                kept = "ref" if variant == "eager" else ("yes" if res.get("kept") else "no")
                if res.get("aborted"):
                    kept = f"no ({res['aborted']})"
                mem = res.get("peak_gpu_mb", res.get("peak_rss_mb"))
                compiles = variant in ("fold-bn", "onnx") or variant_steps(variant).compile != "none"
                compile_s = res.get("compile_s") if compiles else None
                lines.append(
                    f"| {mode} | {variant} | {res['images_per_s']:.3g} | {res['median_s']:.3g} | {spread} "
                    f"| {_fmt(res.get('speedup'), '.2f')}x "
                    f"| {_fmt(100 * res['mfu'] if 'mfu' in res else None, '.1f')}% "
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
    from ..core.io import write_marked_section

    return write_marked_section(results_path, "speed-gpu" if gpu else "speed",
                                f"## Speed{' on GPU' if gpu else ''}\n\n{body.rstrip()}")
