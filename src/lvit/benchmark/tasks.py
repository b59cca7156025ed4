"""What the speed harness runs: the model cases, the jobs a worker process runs, the variants and their error bounds."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

#: Max relative error of an fp32 variant's logits (``max|y - y_ref| / max|y_ref|``) and gradients (L2).
FP32_BOUND = 1e-4
FP32_GRAD_BOUND = 1e-2
#: bf16 keeps ~3 significant digits: looser bounds on logits/gradients, and max |p - p_ref| on probabilities.
BF16_BOUND = 5e-2
BF16_PROB_BOUND = 2e-2

INFERENCE_VARIANTS = ("eager", "channels_last", "fold-bn", "bf16", "compile", "compile-freeze", "onnx")
#: The fast GPU training path, one step at a time; each adds to the one before (``+x`` = the previous step + x).
#: ``+gpu-data`` is the whole step ``lvit train`` runs with ``fast.enabled``: batches gathered and augmented on the
#: device (lvit.data.device), the official Dice + BCE loss, the loss accumulated on the device.
FAST_PATH_VARIANTS = ("bf16+channels_last", "+fused", "+compile", "+cuda-graphs", "+gpu-data")
TRAINING_VARIANTS = ("eager", "channels_last", "bf16", "fused-adam", "compile") + FAST_PATH_VARIANTS


@dataclass(frozen=True)
class Steps:
    """What a variant turns on (every variant is eager fp32 plus these)."""

    bf16: bool = False
    channels_last: bool = False
    fused: bool = False
    compile: str = "none"  # lvit.train.fastpath.compile_module mode
    gpu_data: bool = False
    fold_bn: bool = False
    onnx: bool = False


def variant_steps(variant: str) -> Steps:
    """The :class:`Steps` of a variant name (ValueError for an unknown one)."""
    simple = {"eager": Steps(), "channels_last": Steps(channels_last=True), "bf16": Steps(bf16=True),
              "fused-adam": Steps(fused=True), "compile": Steps(compile="default"),
              "compile-freeze": Steps(compile="default"), "fold-bn": Steps(fold_bn=True), "onnx": Steps(onnx=True)}
    if variant in simple:
        return simple[variant]
    if variant not in FAST_PATH_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    upto = FAST_PATH_VARIANTS[: FAST_PATH_VARIANTS.index(variant) + 1]
    compile_mode = "reduce-overhead" if "+cuda-graphs" in upto else ("default" if "+compile" in upto else "none")
    return Steps(bf16=True, channels_last=True, fused="+fused" in upto, compile=compile_mode,
                 gpu_data="+gpu-data" in upto)


def uses_bf16(variant: str) -> bool:
    """Whether a variant computes in bf16 (so BF16_BOUND applies and MFU is against the bf16 peak)."""
    try:
        return variant_steps(variant).bf16
    except ValueError:
        return False


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
    #: torch.compile backend of the compile variants: inductor; aot_eager / eager check the wiring on a CPU
    #: where inductor's code generation takes minutes.
    compile_backend: str = "inductor"
    #: fp32 training steps on a structured task before a training variant's gradients are compared (0: compare
    #: at the random initialisation, where this BatchNorm network is chaotic: docs/PERFORMANCE.md).
    check_warmup: int = 50

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=json_default)

    @classmethod
    def from_json(cls, text: str) -> Task:
        data = json.loads(text)
        case = Case(**data.pop("case")) if data.get("case") else None
        data.pop("case", None)
        return cls(case=case, **data)


def json_default(value: Any) -> Any:
    if isinstance(value, float) and value == float("inf"):
        return 1e300
    return str(value)


def synth_config() -> tuple[dict[str, Any], str]:
    """The synth preset's model config (key ``model`` of the shipped preset) and where it came from."""
    import yaml

    from ..models import LViTConfig
    from ..presets import preset_path

    path = preset_path("synth")
    model = dict((yaml.safe_load(path.read_text()) or {}).get("model") or {})
    known = {f.name for f in dataclasses.fields(LViTConfig)}
    cfg = {k: v for k, v in model.items() if k in known}
    cfg.setdefault("text_dim", 384)  # the preset's MiniLM encoder
    return cfg, f"preset synth ({path.name})"
