"""Training presets shipped inside the package (``qata``, ``qata-cpu``, ``qata-gpu``, ``mosmed``, ``monuseg``,
``synth``).

Each preset is a YAML file beside this module, read by :func:`lvit.train.config.load_config`. A name is looked
up here; anything else is taken as the path of a user's own YAML file.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The file of the shipped preset ``name``; ConfigError listing the presets when there is none."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{name}: no such preset (presets: {', '.join(preset_names())})")
    return path


def resolve_config(name_or_path: str | Path | None) -> Path | None:
    """A user's YAML file when ``name_or_path`` is one, else the shipped preset of that name (None: defaults)."""
    if name_or_path is None:
        return None
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix == "" and path.parent == Path("."):
        if (PRESET_DIR / f"{path.name}.yaml").is_file():
            return PRESET_DIR / f"{path.name}.yaml"
        raise ConfigError(f"{name_or_path}: no such config file or preset (presets: {', '.join(preset_names())})")
    raise ConfigError(f"{path}: config file not found")
