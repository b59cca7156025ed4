"""``lvit synth OUT``: write the embedded synthetic dataset (official LViT layout)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic chest-radiograph dataset in the official LViT layout",
        description="Write seeded synthetic chest-radiograph phantoms with lesion masks and QaTa-style reports "
        "(Train/Val/Test_Folder, img/, labelcol/, *_text.xlsx) plus DATASHEET.md. Same seed, same bytes.",
    )
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--n-train", type=int, default=200, help="training cases (default 200)")
    p.add_argument("--n-val", type=int, default=40, help="validation cases (default 40)")
    p.add_argument("--n-test", type=int, default=60, help="test cases (default 60)")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError
    from ..data.synthetic import generate_synthetic

    for flag in ("n_train", "n_val", "n_test"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0")
    if args.n_train < 1:
        raise ConfigError("--n-train must be >= 1")
    if not 32 <= args.size <= 4096:
        raise ConfigError("--size must be between 32 and 4096")
    generate_synthetic(args.out, args.n_train, args.n_val, args.n_test, args.size, args.seed, force=args.force)
    return 0
