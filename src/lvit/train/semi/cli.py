"""Command-line flags of semi-supervised training (``lvit train --labeled-fraction 0.25 --semi epi+lv``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...errors import ConfigError

_DEFAULTS = {"labeled_fraction": None, "labeled_list": None, "semi": None, "beta": None, "lv_weight": None,
             "semi_warmup": None, "lv_contrast": None}


def add_semi_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("semi-supervised (paper: EPI pseudo labels + LV loss; see docs/SEMI_SUPERVISED.md)")
    g.add_argument("--labeled-fraction", type=float, default=None, metavar="F",
                   help="keep the masks of a seeded random fraction F of the training images (written to "
                        "RUN_DIR/labelled_subset.json); the others are used with their reports only")
    g.add_argument("--labeled-list", default=None, metavar="FILE",
                   help="keep the masks of the images named in FILE (one per line, or JSON)")
    g.add_argument("--semi", choices=["none", "epi", "epi+lv"], default=None,
                   help="none: supervised on the labelled images only (default); epi: pseudo labels by "
                        "exponential iteration on the unlabelled ones; epi+lv: plus the Language-Vision loss")
    g.add_argument("--beta", type=float, default=None, help="EPI momentum (default 0.99, paper Eq. 8)")
    g.add_argument("--lv-weight", type=float, default=None, help="weight of the LV loss (default 0.1, official)")
    g.add_argument("--semi-warmup", type=int, default=None, metavar="EPOCHS",
                   help="epochs of labelled batches only before pseudo labels start (default 10); "
                        "make it long enough for the model to be good: the pseudo labels start from its prediction")
    g.add_argument("--lv-contrast", default=None, metavar="SOURCE",
                   help="contrast labels of the LV loss: 'labelled' (the labelled images' masks, default), "
                        "'templates' (the 14 chest X-ray templates of the official release) or a folder "
                        "with masks and a table (Image, Description)")


def setup_hook_from_args(args: argparse.Namespace, run_dir: str | Path, resume: bool):
    """The ``setup_hook`` for ``lvit.train.runner.train`` (None for a plain supervised run)."""
    from .module import SemiConfig, make_setup_hook, read_semi_config

    given = {k: getattr(args, k, None) for k in _DEFAULTS if getattr(args, k, None) is not None}
    if resume:
        saved = read_semi_config(run_dir)
        if given:
            raise ConfigError(f"--resume uses the semi-supervised settings saved in {Path(run_dir) / 'semi.json'}; "
                              f"drop {', '.join('--' + k.replace('_', '-') for k in given)}")
        return None if saved is None else make_setup_hook(saved)
    if not given:
        return None
    semi = SemiConfig(mode=args.semi or "none",
                      labeled_fraction=args.labeled_fraction, labeled_list=args.labeled_list)
    if args.beta is not None:
        semi.beta = args.beta
    if args.lv_weight is not None:
        semi.lv_weight = args.lv_weight
    if args.semi_warmup is not None:
        semi.warmup_epochs = args.semi_warmup
    if args.lv_contrast is not None:
        semi.lv_contrast = args.lv_contrast
    if semi.mode == "none" and semi.labeled_fraction is None and semi.labeled_list is None:
        raise ConfigError("--beta/--lv-weight/--semi-warmup/--lv-contrast need --semi and --labeled-fraction")
    return make_setup_hook(semi)
