"""The model registry: every network registers a builder under its name and says whether it reads reports.

    @register_model("lvit-t", reads_text=False, summary="LViT without text")
    def lvit_t(config: LViTConfig) -> nn.Module: ...

``build_model(name, config)`` builds one; ``model_names()`` lists them; ``reads_text(name, config)`` says
whether a built model uses the report (LViT reads it only when ``config.use_text``). Everything that needs a
list of models or a "does it read text" answer (configs, the CLI, data loading, prediction) asks here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import ConfigError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[[Any], Any]  # LViTConfig -> nn.Module
    reads_text: bool  # False: the network ignores any report it is given
    summary: str


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, *, reads_text: bool, summary: str):
    def add(build):
        _MODELS[name] = ModelEntry(name, build, reads_text, summary)
        return build

    return add


def model_names() -> tuple[str, ...]:
    return tuple(_MODELS)


def model_entry(name: str) -> ModelEntry:
    key = str(name).lower().replace("_", "-")
    if key not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(_MODELS)}")
    return _MODELS[key]


def build_model(name: str, config=None):
    """The network ``name`` built from ``config`` (an :class:`~lvit.models.LViTConfig`; defaults if None)."""
    return model_entry(name).build(config)


def reads_text(name: str, config=None) -> bool:
    """Whether the model ``name`` built from ``config`` uses the report (``config`` may be a LViTConfig or its
    dict; LViT reads text only with ``use_text``)."""
    use_text = True
    if config is not None:
        use_text = config.get("use_text", True) if isinstance(config, dict) else getattr(config, "use_text", True)
    return model_entry(name).reads_text and bool(use_text)
