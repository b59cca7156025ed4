"""Run the full speed benchmark and write the Speed section of bench/RESULTS.md (between its markers).

    nice -n -5 python bench/speed.py [lvit bench options...]

is ``lvit bench --results bench/RESULTS.md --out bench/speed.md --force`` plus whatever options are given
(e.g. ``--batch 4``, ``--no-scaling``). The harness itself is :mod:`lvit.benchmark`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lvit.commands.cli import main

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    argv = ["bench", "--results", str(HERE / "RESULTS.md"), "--out", str(HERE / "speed.md"), "--force",
            *sys.argv[1:]]
    sys.argv = ["lvit", *argv]  # recorded as the command in the report
    sys.exit(main(argv))
