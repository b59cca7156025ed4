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
Modules: :mod:`.tasks` (what to run), :mod:`.runners` and :mod:`.worker` (one variant in a worker process),
:mod:`.harness` (plan, spawn, collect), :mod:`.render` (Markdown).
"""

from .harness import Options, cpu_name, machine_info, machine_line, plan, run_benchmark
from .render import render_markdown, write_speed_section
from .tasks import BF16_BOUND, FP32_BOUND, INFERENCE_VARIANTS, TRAINING_VARIANTS, Case, Task

__all__ = ["BF16_BOUND", "FP32_BOUND", "INFERENCE_VARIANTS", "TRAINING_VARIANTS", "Case", "Options", "Task",
           "cpu_name", "machine_info", "machine_line", "plan", "render_markdown", "run_benchmark",
           "write_speed_section"]
