"""What the benchmark scripts share: where things are, the common arguments, run folders, raw JSON and the
rendered sections of bench/RESULTS.md. Every bench script imports this file (it sits beside them)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS_MD = BENCH / "RESULTS.md"


def add_data_args(p: argparse.ArgumentParser, work: bool = True, what: str = "QaTa-COV19 root (either layout)") -> None:
    """--data (the dataset root) and, with ``work``, --work (the folder holding the run folders, WORK/runs)."""
    p.add_argument("--data", type=Path, required=True, help=what)
    if work:
        p.add_argument("--work", type=Path, required=True, help="work folder (run folders in WORK/runs; outside the "
                                                                "repository)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--models (shipped names or run/model folders), --reports (true or none) and --threads: the arguments of the
    scripts that score trained models on QaTa-COV19's splits."""
    p.add_argument("--models", default="qata-lvit", help="comma-separated shipped names or run/model folders")
    p.add_argument("--reports", choices=("true", "none"), default="true")
    p.add_argument("--threads", type=int, default=1)


def add_results_args(p: argparse.ArgumentParser, results: Path) -> None:
    """--results (the raw JSON file) and --results-md (the Markdown file its section is rendered into)."""
    p.add_argument("--results", type=Path, default=results, help=f"raw results (default {results.relative_to(REPO)})")
    p.add_argument("--results-md", type=Path, default=RESULTS_MD, help="Markdown file for the section")


def runs_folder(work: Path) -> Path:
    """``WORK/runs``: where bench/qata.py trains its runs."""
    return Path(work) / "runs"


def run_folder(work: Path, name: str) -> Path:
    """``WORK/runs/NAME``: one run of bench/qata.py."""
    return runs_folder(work) / name


def read_raw(path: Path, default=None):
    """A raw results file (JSON), or ``default`` when it does not exist yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


def write_raw(path: Path, data) -> Path:
    """Write raw results as JSON (indented, keys sorted, atomically)."""
    from lvit.core.io import atomic_write_text

    return atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def render_section(name: str, body: str, md: Path = RESULTS_MD) -> Path:
    """Put ``body`` between the ``<!-- name:start/end -->`` markers of ``md`` (bench/RESULTS.md)."""
    from lvit.core.io import write_marked_section

    return write_marked_section(md, name, body)


def bench_module(name: str):
    """Another bench script (``bench/NAME.py``) as a module."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
