"""Command-line flags of semi-supervised training (``lvit train --labeled-fraction 0.25 --semi epi+lv``): each a
shortcut for a ``--set semi.<key>=<value>`` override of the run config's ``semi`` section."""

from __future__ import annotations

import argparse
import json

from ..core.errors import ConfigError
from .config import SEMI_MODES

# flag dest -> key of the semi section
FLAG_KEYS = {"labeled_fraction": "labeled_fraction", "labeled_list": "labeled_list", "semi": "mode",
             "beta": "beta", "lv_weight": "lv_weight", "semi_warmup": "warmup_epochs", "lv_contrast": "lv_contrast",
             "ema_decay": "ema_decay", "confidence": "confidence", "consistency_weight": "consistency_weight"}


PATH_FLAGS = ("labeled_list", "lv_contrast")  # free text: a file or a folder (lv_contrast also a keyword)


def add_semi_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("semi-supervised (paper: EPI pseudo labels + LV loss; see docs/SEMI_SUPERVISED.md); "
                             "every setting of the config's semi section is also reachable as --set semi.KEY=VALUE")
    g.add_argument("--labeled-fraction", type=float, default=None, metavar="F",
                   help="keep the masks of a seeded random fraction F of the training images (written to "
                        "RUN_DIR/labelled_subset.json); the others are used with their reports only")
    g.add_argument("--labeled-list", default=None, metavar="FILE",
                   help="keep the masks of the images named in FILE (one per line, or JSON)")
    g.add_argument("--semi", choices=list(SEMI_MODES), default=None,
                   help="none: supervised on the labelled images only (default); epi: pseudo labels by "
                        "exponential iteration on the unlabelled ones; epi+lv: plus the Language-Vision loss; "
                        "mean-teacher: an EMA teacher's confident labels on a weak view train the student on a "
                        "strong view (lvit's recipe, not the paper's)")
    g.add_argument("--beta", type=float, default=None, help="EPI momentum (semi.beta, default 0.99, paper Eq. 8)")
    g.add_argument("--lv-weight", type=float, default=None,
                   help="weight of the LV loss (semi.lv_weight, default 0.1, official)")
    g.add_argument("--semi-warmup", type=int, default=None, metavar="EPOCHS",
                   help="epochs of labelled batches only before pseudo labels start (semi.warmup_epochs, default "
                        "10); make it long enough for the model to be good: "
                        "the pseudo labels start from its prediction")
    g.add_argument("--lv-contrast", default=None, metavar="SOURCE",
                   help="contrast labels of the LV loss: 'labelled' (the labelled images' masks, default), "
                        "'templates' (the 14 chest X-ray templates of the official release) or a folder "
                        "with masks and a table (Image, Description)")
    g.add_argument("--ema-decay", type=float, default=None,
                   help="mean-teacher: teacher = d * teacher + (1 - d) * student per step (semi.ema_decay, 0.99)")
    g.add_argument("--confidence", type=float, default=None,
                   help="mean-teacher: teacher probabilities between 1 - C and C are ignored (semi.confidence, 0.9)")
    g.add_argument("--consistency-weight", type=float, default=None,
                   help="mean-teacher: weight of the consistency term after its ramp-up "
                        "(semi.consistency_weight, 1.0)")


def semi_overrides(args: argparse.Namespace, resume: bool = False) -> list[str]:
    """The ``semi.<key>=<value>`` overrides the flags stand for. A resumed run keeps its own settings."""
    given = {dest: getattr(args, dest) for dest in FLAG_KEYS if getattr(args, dest, None) is not None}
    if resume and given:
        raise ConfigError("--resume keeps the semi-supervised settings saved in the run's config.yaml; drop "
                          + ", ".join("--" + dest.replace("_", "-") for dest in given))
    # Paths go quoted, so that YAML keeps them as written (a file named "on", "1e3" or "a #1").
    return [f"semi.{FLAG_KEYS[dest]}={json.dumps(value) if dest in PATH_FLAGS else value}"
            for dest, value in given.items()]
