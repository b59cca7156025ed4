"""The frozen network a run distils from (``loss.distill_teacher``): loaded once, checked to read what the run reads.

The distillation term (:func:`lvit.train.losses.distillation_loss`) pulls the no-report answer of the rows whose
report was dropped towards an answer with the report. By default that answer is the network's own; a teacher named
here gives a fully trained reader's answer from the first step instead. It must see the same inputs as the student:
the same image size and channels, and the same report encoding (encoder, tokens, vector size), since the student's
encoded reports are handed to it as they are.
"""

from __future__ import annotations

from torch import nn

from ..core.errors import ConfigError

#: Settings of the teacher's network that must equal the student's (the inputs it is handed).
SHARED_MODEL_SETTINGS = ("image_size", "in_channels", "text_tokens", "text_dim")
#: Settings of the report encoding that must equal the student's.
SHARED_TEXT_SETTINGS = ("spec", "max_tokens", "min_words", "dim")


def load_distill_teacher(source: str, model_config, text_info: dict | None, learns_text: bool) -> nn.Module:
    """The eval-mode network of ``source`` (run folder, model folder or shipped model name), or a one-line
    ConfigError naming ``loss.distill_teacher`` and the first setting in which it does not read the student's
    inputs. ``model_config``: the student's :class:`~lvit.models.LViTConfig`; ``text_info``: its encoder's
    description (the run config's ``text_encoder``); ``learns_text``: the student trains its own text embedding."""
    from ..artifacts.runs import load_run
    from ..core.errors import CheckpointError

    where = f"loss.distill_teacher {source}"
    if learns_text:
        raise ConfigError(f"{where}: this run learns its own text embedding, which a teacher cannot read; use a "
                          "fixed text encoder (for example text.encoder=minilm)")
    try:
        run = load_run(source)
    except CheckpointError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not run.reads_text:
        raise ConfigError(f"{where}: a {run.model_name} network reads no report, so it has no answer with one")
    theirs = run.config.get("model") or {}
    for key in SHARED_MODEL_SETTINGS:
        if theirs.get(key) != getattr(model_config, key):
            raise ConfigError(f"{where}: its model.{key} is {theirs.get(key)!r}, this run's "
                              f"{getattr(model_config, key)!r}")
    their_text = run.config.get("text_encoder") or {}
    for key in SHARED_TEXT_SETTINGS:
        if their_text.get(key) != (text_info or {}).get(key):
            raise ConfigError(f"{where}: its text encoder's {key} is {their_text.get(key)!r}, this run's "
                              f"{(text_info or {}).get(key)!r}")
    return run.model.float().eval()


__all__ = ["SHARED_MODEL_SETTINGS", "SHARED_TEXT_SETTINGS", "load_distill_teacher"]
