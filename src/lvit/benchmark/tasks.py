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
TRAINING_VARIANTS = ("eager", "channels_last", "bf16", "fused-adam", "compile")


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
