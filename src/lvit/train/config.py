"""Training configuration: YAML presets mapped onto dataclasses, with ``--set key=value`` overrides.

A preset (``lvit.presets``: ``qata``, ``synth`` ...) is plain data::

    model_name: lvit            # lvit | lvit-t | unet
    model: {image_size: 224, base_channels: 64, text_tokens: 10, ...}   # LViTConfig fields
    text: {encoder: minilm}     # lvit.text.get_text_encoder spec
    data: {batch_size: 24, augment: true, num_workers: 2}
    optim: {name: adam, lr: 3.0e-4, scheduler: cosine_restarts, t0: 10, eta_min: 1.0e-4}
    loss: {dice_weight: 0.5, bce_weight: 0.5}
    trainer: {max_epochs: 2000, patience: 50, precision: 32-true, seed: 666}

Every key is checked: an unknown key, a value of the wrong type or a NaN/inf number raises
:class:`~lvit.core.errors.ConfigError` naming the file (or ``--set``) and the key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import ConfigError

PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")


def _default_model_config():
    from ..models import LViTConfig

    return LViTConfig()


@dataclass
class TextConfig:
    """Which text encoder turns reports into token embeddings (see :func:`lvit.text.get_text_encoder`)."""

    encoder: str = "minilm"
    # Where encoded reports are cached (safetensors); None: ``<data root>/.lvit_text_cache``.
    cache_dir: str | None = None
    # Reworded copies of each training report (lvit.data.wording) a sample may read instead of the original.
    wording_variants: int = 0
    # Up to this many empty positions inserted at random among a training report's word pieces (within the
    # model's L; lvit.train.token_shift): the words read at other positions, no word changed. 0: off.
    token_shift: int = 0
    # Probability that a training report's word pieces are read in a random order, in their own positions
    # (lvit.train.token_shift): no word changed, added or removed. 0: off.
    token_shuffle: float = 0.0


@dataclass
class DataConfig:
    root: str | None = None  # dataset root (Train_Folder/Val_Folder/Test_Folder); `--data` sets it
    batch_size: int = 24
    val_batch_size: int | None = None  # None: same as batch_size
    augment: bool = True  # random flips/rotations on the training split (lvit.data)
    # Horizontal mirror of a training image with this probability, its report's left and right swapped with it
    # (a mirror moves the lesion to the other lung); 0 keeps the official recipe, which never mirrors.
    hflip_prob: float = 0.0
    num_workers: int = 2


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw
    lr: float = 3e-4
    weight_decay: float = 0.0
    # Official: CosineAnnealingWarmRestarts(T_0=10, T_mult=1, eta_min=1e-4), stepped once per epoch.
    scheduler: str = "cosine_restarts"  # cosine_restarts | none
    t0: int = 10
    t_mult: int = 1
    # Must lie below lr; when it does not (e.g. lr 1e-4 with the official eta_min 1e-4) it is clamped
    # to lr / 10 so the schedule still anneals instead of rising.
    eta_min: float = 1e-4
    grad_clip: float | None = None  # clip the global gradient norm to this value (None: off)
    # Validate and save an exponential moving average of the weights with this decay per optimizer step
    # (lvit.train.ema; 0: off, the network as trained). Not with semi.mode mean-teacher, whose teacher is one.
    ema_decay: float = 0.0


@dataclass
class LossConfig:
    """Official loss: 0.5 * weighted soft Dice + 0.5 * class-balanced BCE (utils.WeightedDiceBCE)."""

    dice_weight: float = 0.5
    bce_weight: float = 0.5
    # Weight of the report prior's loss (model.report_prior): cosine distance of the report estimated from the
    # image to the true report's token embeddings.
    report_prior_weight: float = 0.2
    # With report dropout: weight of the distillation term that pulls the no-report answer of each dropped sample
    # towards the same network's answer with its report (eval mode, no gradient); 0: off.
    distill_weight: float = 0.0
    # The first epoch (counted from 0) that has the distillation term: the answer with the report is a poor
    # target before the network has learnt to read it, and pulling towards it then also drags the report path.
    distill_start_epoch: int = 0
    # The network whose answer with the report is the target (a run folder, model folder or shipped model name;
    # frozen, eval mode) instead of the network being trained: a fully trained reader from the first step, which
    # the student's own updates cannot move. None: the network itself.
    distill_teacher: str | None = None


@dataclass
class TrainerConfig:
    max_epochs: int = 2000
    patience: int | None = 50  # early stopping on val Dice (None: off)
    precision: str = "32-true"  # 32-true | bf16-mixed (CPU or GPU) | 16-mixed (GPU)
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int | str = 1  # number of devices per node, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto (ddp when devices * num_nodes > 1) | ddp | ...
    seed: int = 666  # official seed
    deterministic: bool = True
    progress: bool = True  # tqdm progress bars
    log_every_n_steps: int = 10
    # Start from another run's weights (run folder or .safetensors): tensors matching by name and shape are
    # loaded (lvit.train.init_from); ignored on resume.
    init_from: str | None = None


SEMI_MODES = ("none", "epi", "epi+lv", "mean-teacher")
# Settings of the mean-teacher recipe only (docs/SEMI_SUPERVISED.md, "Mean teacher"): refused with another mode,
# where they would be silently ignored.
MEAN_TEACHER_KEYS = ("ema_decay", "confidence", "consistency_weight", "rampup_epochs", "unlabelled_batch",
                     "eval_model", "cutmix")
EVAL_MODELS = ("teacher", "student")


@dataclass
class SemiConfig:
    """Semi-supervised training (section ``semi``; docs/SEMI_SUPERVISED.md). Inactive unless a labelled subset
    or a mode other than ``none`` is set."""

    mode: str = "none"  # none (supervised on the labelled subset only) | epi | epi+lv | mean-teacher
    labeled_fraction: float | None = None  # seeded random fraction of the training images keeping masks
    labeled_list: str | None = None  # or a file of names (one per line, or JSON)
    seed: int | None = None  # subset seed (None: trainer.seed)
    beta: float = 0.99  # EPI momentum (paper Eq. 8)
    lv_weight: float = 0.1  # alpha of the LV loss on unlabelled images (official 0.1)
    # Epochs trained on labelled batches only before pseudo labels start (the bank starts from the warm-up
    # model's prediction); each as many steps as a full epoch. Not in the paper; see docs/SEMI_SUPERVISED.md.
    warmup_epochs: int = 10
    pseudo_threshold: float | None = None  # None: soft targets (probabilities); else binarise P_t at this value
    lv_contrast: str = "labelled"  # labelled (masks of the labelled images) | templates (14 chest X-rays) | PATH
    lv_encoder: str | None = None  # text encoder spec for report vectors (None: the run's, or minilm)
    lv_max_tokens: int = 64  # tokens of a report seen by the report vectors (whole structured reports)
    storage: str = "auto"  # pseudo-label bank: memory | disk | auto
    # mean-teacher (lvit.train.semi.mean_teacher); warmup_epochs above counts its labelled-only epochs too.
    ema_decay: float = 0.99  # teacher = ema_decay * teacher + (1 - ema_decay) * student, after every optimizer step
    confidence: float = 0.9  # teacher probabilities strictly between 1 - confidence and confidence are ignored
    consistency_weight: float = 1.0  # weight of the consistency term once ramped up
    rampup_epochs: float = 2.0  # sigmoid ramp-up exp(-5 (1 - t)^2) of that weight over these epochs after warm-up
    unlabelled_batch: int | None = None  # unlabelled images per step beside data.batch_size labelled (None: same)
    eval_model: str = "teacher"  # teacher | student: the weights validated and saved as best/last
    cutmix: float = 0.0  # probability of a box from another unlabelled image with the same report (0: off)

    @property
    def active(self) -> bool:
        return self.labeled_fraction is not None or self.labeled_list is not None or self.mode != "none"

    @property
    def uses_lv(self) -> bool:
        return self.mode == "epi+lv"

    def validate(self, source: str = "config") -> None:
        where = f"{source}: semi"
        if self.mode not in SEMI_MODES:
            raise ConfigError(f"{where}.mode (--semi) must be one of {', '.join(SEMI_MODES)}, got {self.mode!r}")
        if self.labeled_fraction is not None and self.labeled_list is not None:
            raise ConfigError(f"{where}: give labeled_fraction or labeled_list (--labeled-fraction/--labeled-list), "
                              "not both")
        if not self.active:  # a semi setting without a labelled subset would be silently ignored
            changed = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
            if changed:
                raise ConfigError(f"{where}.{changed[0]} is set but semi-supervised training is off: give "
                                  "--labeled-fraction or --labeled-list (and --semi)")
        if self.mode != "none" and self.labeled_fraction is None and self.labeled_list is None:
            raise ConfigError(f"{where}.mode {self.mode} needs --labeled-fraction or --labeled-list")
        if self.labeled_fraction is not None and not 0.0 < self.labeled_fraction <= 1.0:
            raise ConfigError(f"{where}.labeled_fraction must be in (0, 1], got {self.labeled_fraction}")
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"{where}.beta (--beta) must be in [0, 1), got {self.beta}")
        if self.lv_weight < 0:
            raise ConfigError(f"{where}.lv_weight (--lv-weight) must be >= 0, got {self.lv_weight}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"{where}.warmup_epochs (--semi-warmup) must be >= 0, got {self.warmup_epochs}")
        if self.pseudo_threshold is not None and not 0.0 < self.pseudo_threshold < 1.0:
            raise ConfigError(f"{where}.pseudo_threshold must be in (0, 1), got {self.pseudo_threshold}")
        if self.storage not in ("auto", "memory", "disk"):
            raise ConfigError(f"{where}.storage must be auto, memory or disk, got {self.storage!r}")
        if self.mode != "mean-teacher":
            defaults = SemiConfig()
            changed = [k for k in MEAN_TEACHER_KEYS if getattr(self, k) != getattr(defaults, k)]
            if changed:
                raise ConfigError(f"{where}.{changed[0]} is a mean-teacher setting, but semi.mode is {self.mode}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{where}.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"{where}.confidence must be in [0.5, 1) (0.5: every pixel counts), got "
                              f"{self.confidence}")
        if self.consistency_weight < 0:
            raise ConfigError(f"{where}.consistency_weight must be >= 0, got {self.consistency_weight}")
        if self.rampup_epochs < 0:
            raise ConfigError(f"{where}.rampup_epochs must be >= 0, got {self.rampup_epochs}")
        if self.unlabelled_batch is not None and (isinstance(self.unlabelled_batch, bool)
                                                  or not isinstance(self.unlabelled_batch, int)
                                                  or self.unlabelled_batch < 1):
            raise ConfigError(f"{where}.unlabelled_batch must be an integer >= 1 or null, got "
                              f"{self.unlabelled_batch!r}")
        if self.eval_model not in EVAL_MODELS:
            raise ConfigError(f"{where}.eval_model must be teacher or student, got {self.eval_model!r}")
        if not 0.0 <= self.cutmix <= 1.0:
            raise ConfigError(f"{where}.cutmix must be a probability in [0, 1] (0: off), got {self.cutmix!r}")


# = lvit.train.fastpath.COMPILE_MODES (kept here so that reading a config never imports torch; a test keeps them equal)
FAST_COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class FastConfig:
    """The fast GPU training path (section ``fast``; docs/PERFORMANCE.md, preset ``qata-gpu``). Off unless
    ``enabled``; bf16 is ``trainer.precision: bf16-mixed`` as before. One device only, not with ``semi``."""

    enabled: bool = False
    channels_last: bool = True  # NHWC model and batches
    fused_optimizer: bool = True  # Adam/AdamW(fused=True)
    compile: str = "default"  # none | default | reduce-overhead (CUDA graphs) | max-autotune[-no-cudagraphs]
    # inductor; aot_eager_decomp_partition / eager test the wiring where inductor is too slow (lvit.train.fastpath)
    compile_backend: str = "inductor"
    device_data: bool = True  # datasets decoded once into uint8 tensors on the device, augmented there
    decode_workers: int = 8  # threads decoding the files once at start-up

    def validate(self, source: str = "config") -> None:
        if self.compile not in FAST_COMPILE_MODES:
            raise ConfigError(f"{source}: fast.compile '{self.compile}' is not one of {', '.join(FAST_COMPILE_MODES)}")
        if not self.compile_backend:
            raise ConfigError(f"{source}: fast.compile_backend must name a torch.compile backend")
        if self.decode_workers < 1:
            raise ConfigError(f"{source}: fast.decode_workers must be >= 1 (got {self.decode_workers})")


@dataclass
class TrainConfig:
    model_name: str = "lvit"  # a name registered in lvit.models (lvit.models.model_names())
    model: Any = field(default_factory=_default_model_config)  # lvit.models.LViTConfig
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    fast: FastConfig = field(default_factory=FastConfig)

    def to_dict(self) -> dict:
        out = {"model_name": self.model_name, "model": self.model.to_dict()}
        for name in ("text", "data", "optim", "loss", "trainer", "semi", "fast"):
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> TrainConfig:
        from ..models import LViTConfig

        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        cfg = cls()
        if "model_name" in data:
            cfg.model_name = _coerce(data["model_name"], str, f"{source}: model_name")
        from ..models import model_names

        if cfg.model_name not in model_names():
            raise ConfigError(f"{source}: model_name '{cfg.model_name}' is not one of {', '.join(model_names())}")
        cfg.model = _build(LViTConfig, data.get("model", {}) or {}, f"{source}: model")
        for name, klass in (("text", TextConfig), ("data", DataConfig), ("optim", OptimConfig),
                            ("loss", LossConfig), ("trainer", TrainerConfig), ("semi", SemiConfig),
                            ("fast", FastConfig)):
            setattr(cfg, name, _build(klass, data.get(name, {}) or {}, f"{source}: {name}"))
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        self.semi.validate(source)
        self.fast.validate(source)
        if self.fast.enabled and (self.trainer.devices != 1 or self.trainer.num_nodes != 1):
            raise ConfigError(f"{source}: fast.enabled trains on one device (trainer.devices 1, num_nodes 1)")
        if self.fast.enabled and self.semi.active:
            raise ConfigError(f"{source}: fast.enabled does not combine with semi-supervised training (section semi)")
        o, t = self.optim, self.trainer
        if o.name not in ("adam", "adamw"):
            raise ConfigError(f"{source}: optim.name '{o.name}' is not adam or adamw")
        if o.scheduler not in ("cosine_restarts", "none"):
            raise ConfigError(f"{source}: optim.scheduler '{o.scheduler}' is not cosine_restarts or none")
        if not o.lr > 0:
            raise ConfigError(f"{source}: optim.lr must be > 0 (got {o.lr})")
        if o.t0 < 1 or o.t_mult < 1:
            raise ConfigError(f"{source}: optim.t0 and optim.t_mult must be >= 1")
        ema = o.ema_decay
        if isinstance(ema, bool) or not isinstance(ema, int | float) or not 0.0 <= ema < 1.0:
            raise ConfigError(f"{source}: optim.ema_decay must be a number in [0, 1) (got {ema!r}; 0: off)")
        if ema and str(self.trainer.precision) == "bf16-true":
            raise ConfigError(f"{source}: optim.ema_decay does not combine with trainer.precision bf16-true: in "
                              "bfloat16 most of each small update to the average is rounded away")
        if ema and self.semi.mode == "mean-teacher":
            raise ConfigError(f"{source}: optim.ema_decay does not combine with semi.mode mean-teacher (its teacher "
                              "is already a weight average: semi.ema_decay)")
        if o.grad_clip is not None and (not isinstance(o.grad_clip, (int, float)) or not o.grad_clip > 0):
            raise ConfigError(f"{source}: optim.grad_clip must be > 0 or null (got {o.grad_clip})")
        flip = self.data.hflip_prob
        if isinstance(flip, bool) or not isinstance(flip, int | float) or not 0.0 <= flip <= 1.0:
            raise ConfigError(f"{source}: data.hflip_prob must be a probability in [0, 1] (got {flip!r})")
        if flip and not self.data.augment:
            raise ConfigError(f"{source}: data.hflip_prob needs data.augment: true (the mirror is an augmentation)")
        if self.data.batch_size < 1:
            raise ConfigError(f"{source}: data.batch_size must be >= 1 (got {self.data.batch_size})")
        if t.max_epochs < 1:
            raise ConfigError(f"{source}: trainer.max_epochs must be >= 1 (got {t.max_epochs})")
        if t.patience is not None and t.patience < 1:
            raise ConfigError(f"{source}: trainer.patience must be >= 1 or null (got {t.patience})")
        if str(t.precision) not in PRECISIONS:
            raise ConfigError(f"{source}: trainer.precision '{t.precision}' is not one of {', '.join(PRECISIONS)}")
        if self.loss.dice_weight < 0 or self.loss.bce_weight < 0 or self.loss.dice_weight + self.loss.bce_weight == 0:
            raise ConfigError(f"{source}: loss weights must be >= 0 and not both 0")
        if not self.loss.report_prior_weight >= 0:
            raise ConfigError(f"{source}: loss.report_prior_weight must be >= 0 (got {self.loss.report_prior_weight})")
        distill = self.loss.distill_weight
        if isinstance(distill, bool) or not isinstance(distill, int | float) or not distill >= 0:
            raise ConfigError(f"{source}: loss.distill_weight must be a number >= 0 (got {distill!r})")
        if distill and not (self.model.use_text and float(self.model.report_dropout) > 0):
            raise ConfigError(f"{source}: loss.distill_weight needs model.report_dropout > 0 (it distils the report's "
                              "answer into the no-report path)")
        start = self.loss.distill_start_epoch
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ConfigError(f"{source}: loss.distill_start_epoch must be an integer >= 0 (got {start!r})")
        if distill and start >= t.max_epochs:
            raise ConfigError(f"{source}: loss.distill_start_epoch must be below trainer.max_epochs "
                              f"({t.max_epochs}; got {start}): the distillation would never run")
        if start and not distill:
            raise ConfigError(f"{source}: loss.distill_start_epoch has no effect without loss.distill_weight > 0")
        teacher = self.loss.distill_teacher
        if teacher is not None and (not isinstance(teacher, str) or not teacher.strip()):
            raise ConfigError(f"{source}: loss.distill_teacher must be a run folder, model folder or shipped model "
                              f"name (got {teacher!r})")
        if teacher is not None and not distill:
            raise ConfigError(f"{source}: loss.distill_teacher has no effect without loss.distill_weight > 0")
        if distill and self.fast.enabled:
            raise ConfigError(f"{source}: loss.distill_weight is not available on the fast path (fast.enabled): its "
                              "training step has no distillation term")
        shift = self.text.token_shift
        if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift <= 16:
            raise ConfigError(f"{source}: text.token_shift must be an integer from 0 to 16 (got {shift!r})")
        shuffle = self.text.token_shuffle
        if isinstance(shuffle, bool) or not isinstance(shuffle, int | float) or not 0.0 <= shuffle <= 1.0:
            raise ConfigError(f"{source}: text.token_shuffle must be a probability in [0, 1] (got {shuffle!r})")
        for key, value in (("token_shift", shift), ("token_shuffle", shuffle)):  # both move a report's word pieces
            if value and self.semi.mode == "mean-teacher":
                raise ConfigError(f"{source}: text.{key} does not combine with semi.mode mean-teacher: its training "
                                  "step reads the reports as they are once the teacher runs")
            if value and not self.model.use_text:
                raise ConfigError(f"{source}: text.{key} needs a model that reads reports (model.use_text=true)")
            if value and self.fast.enabled:
                raise ConfigError(f"{source}: text.{key} is not available on the fast path (fast.enabled): its "
                                  "training step reads the reports as they are")
        variants = self.text.wording_variants
        if isinstance(variants, bool) or not isinstance(variants, int) or not 0 <= variants <= 16:
            raise ConfigError(f"{source}: text.wording_variants must be an integer from 0 to 16 (got {variants!r})")

    @property
    def effective_eta_min(self) -> float:
        """eta_min of the cosine schedule, clamped below lr (see OptimConfig.eta_min)."""
        return self.optim.eta_min if self.optim.eta_min < self.optim.lr else self.optim.lr / 10


# --------------------------------------------------------------------------------------------------
# Loading and overrides


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML preset (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            problem = str(exc).replace("\n", " ")
            raise ConfigError(f"{path}: invalid YAML ({problem})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    file_data = copy.deepcopy(data)
    for item in overrides or []:
        apply_override(data, item)
    try:
        return TrainConfig.from_dict(data, source)
    except ConfigError as exc:
        if not overrides:
            raise
        TrainConfig.from_dict(file_data, source)  # the file (or the defaults) alone at fault: raises naming it
        raise ConfigError(_blame_overrides(str(exc), source, list(overrides))) from None


def _blame_overrides(message: str, source: str, overrides: list[str]) -> str:
    """Re-address a validation error caused by ``--set`` overrides to them instead of the preset file."""
    import re

    body = message[len(source) + 2:] if message.startswith(f"{source}: ") else message
    keys = {item.split("=", 1)[0].strip(): item for item in overrides}
    named = [item for key, item in keys.items() if re.search(rf"\b{re.escape(key.split('.')[-1])}\b", body)]
    culprits = named or list(keys.values())
    return f"--set {', --set '.join(culprits)}: {body}"


def apply_override(data: dict, item: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML) to the raw config mapping."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value, e.g. optim.lr=1e-3")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-3 as a string (it wants 1.0e-3): accept plain float spellings too, unless the value was quoted
    # (a quoted value is a string: how path flags pass through, e.g. --init-from "runs/1e3").
    if isinstance(value, str) and raw.strip()[:1] not in ("'", '"'):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"--set {item}: {key.strip()}: value must be a finite number (got {raw.strip()})")
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {item}: empty key component")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _build(klass, values: Mapping[str, Any], where: str):
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(klass)}
    default = klass()
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(value, type(getattr(default, key)), f"{where}.{key}", getattr(default, key))
    return dataclasses.replace(default, **kwargs)


def _coerce(value: Any, kind: type, where: str, default: Any = None) -> Any:
    """Check ``value`` against the type of the field's default; numbers must be finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: value must be a finite number (got {value})")
    if isinstance(value, str) and value.strip().lower() in ("nan", ".nan", "inf", "+inf", "-inf", ".inf", "-.inf"):
        raise ConfigError(f"{where}: value must be a finite number (got {value})")
    if value is None:
        return None  # optional fields (grad_clip, patience, cache_dir ...)
    if default is None or kind is type(None):
        # Optional field whose default is None: accept numbers and strings as given.
        if isinstance(value, (int, float, str, bool)):
            return value
        raise ConfigError(f"{where}: expected a number or string, got {type(value).__name__}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and where.endswith("devices") and value == "auto":
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if kind in (tuple, list):
        if isinstance(value, (list, tuple)):
            return kind(value)
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Which preset a run was trained from

# Settings that do not change what a run learns: left out of the preset comparison.
PRESET_IGNORED_SETTINGS = {"model.text_dim", "data.num_workers", "trainer.progress", "trainer.accelerator",
                     "trainer.devices", "trainer.num_nodes", "trainer.strategy", "text.cache_dir"}



def flat_settings(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        out.update(flat_settings(value, f"{prefix}{key}.") if isinstance(value, Mapping) else {f"{prefix}{key}": value})
    return out


def closest_preset(run_config: dict) -> tuple[str | None, list[str]]:
    """The shipped preset closest to the run's training settings and the settings that differ
    (``["trainer.max_epochs=1", ...]``); the preset the config records, if any; (None, []) when none is close
    (at most 8 differences)."""
    from ..presets import preset_names, preset_path

    recorded = run_config.get("preset")
    if isinstance(recorded, dict) and recorded.get("name"):  # a model folder's config.json
        return str(recorded["name"]), list(recorded.get("changed") or [])
    if isinstance(recorded, str) and recorded:
        return recorded, []
    sections = ("model_name", "model", "text", "data", "optim", "loss", "trainer", "semi")
    ours = flat_settings({k: run_config[k] for k in sections if k in run_config})
    best: tuple[int, str, list[str]] | None = None
    for name in preset_names():
        try:
            theirs = flat_settings(load_config(preset_path(name)).to_dict())
        except ConfigError:
            continue
        diffs = [f"{key}={ours[key]}" for key in sorted(ours)
                 if key in theirs and key not in PRESET_IGNORED_SETTINGS and ours[key] != theirs[key]]
        if best is None or len(diffs) < best[0]:
            best = (len(diffs), name, diffs)
    if best is None or best[0] > 8:
        return None, []
    return best[1], best[2]
