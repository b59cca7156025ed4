"""The ``lvit`` command line. Thin: parse arguments, call the library, print one-line errors.

Each subcommand lives in ``lvit/commands/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed namespace, returning an exit code). Modules are imported
lazily by name so ``lvit --help`` stays fast and one broken optional dependency cannot break every command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..core.errors import LvitError
from ..core.openmp import apply_wait_policy

# Order is the order shown in ``lvit --help``.
COMMANDS = [
    "demo",
    "synth",
    "check_data",
    "describe",
    "train",
    "train_reporter",
    "test",
    "calibrate",
    "predict",
    "explain",
    "report",
    "export",
    "app",
    "bench",
    "model_info",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvit",
        description="Language-guided medical image segmentation with LViT.",
    )
    parser.add_argument("--version", action="version", version=f"lvit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lvit.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"lvit.commands.{name}":
                continue  # command not built yet in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`lvit ... | head`): stop quietly, as other command-line tools do. stdout now points
        # at /dev/null so that the interpreter's last flush at exit cannot fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a process ended by a closed pipe


def _main(argv: list[str] | None) -> int:
    apply_wait_policy()  # before any command imports torch
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("LVIT_DEBUG") == "1"
    try:
        return int(args.func(args) or 0)
    except LvitError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
