"""Arguments several commands share (the model to use, the device, the report writer), said once."""

from __future__ import annotations

import argparse


def add_model_argument(p: argparse.ArgumentParser) -> None:
    """The optional MODEL argument of the commands that answer with a model (predict, app)."""
    p.add_argument("checkpoint", metavar="MODEL", nargs="?", default=None,
                   help="a run folder, its .safetensors weights, a model folder (lvit export --hf) or a shipped "
                        "model's name (default: the shipped QaTa-COV19 chest X-ray model, qata-lvit)")


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def add_reporter_argument(p: argparse.ArgumentParser, what: str) -> None:
    """--reporter DIR: a report writer folder (lvit train-reporter) for ``what``."""
    p.add_argument("--reporter", metavar="DIR", default=None,
                   help=f"report writer folder (lvit train-reporter) {what}; default: the run's own RUN/reporter/ "
                        "when it has one")


def default_model(checkpoint: str | None, say: str) -> str:
    """``checkpoint``, or the shipped model's name when none is given (announced as ``say`` + which)."""
    from ..artifacts.runs import DEFAULT_MODEL, shipped_model
    from ..core.errors import ConfigError

    if checkpoint is not None:
        return checkpoint
    folder = shipped_model(DEFAULT_MODEL)
    if folder is None:
        raise ConfigError(f"no model given and this lvit ships no {DEFAULT_MODEL}: pass a run or model folder")
    print(say.format(name=DEFAULT_MODEL, folder=folder), flush=True)
    return DEFAULT_MODEL
