"""``lvit check-data``: read every file of a dataset once and list ALL problems, not just the first."""

from __future__ import annotations

from pathlib import Path

from .layout import LAYOUTS, detect_layout
from .records import Problem


def _rel(path: Path, root: Path) -> str:
    try:
        rel = Path(path).relative_to(root)
    except ValueError:
        return str(path)
    return str(path) if rel == Path(".") else str(rel)


def check_data(
    root: str | Path,
    image_column: str = "Image",
    text_column: str = "Description",
    progress: bool = False,
) -> list[Problem]:
    """All findings for the dataset at ``root``, in its detected layout. Findings with ``note=True`` are
    reported but are not faults; no faults means the dataset is fine."""
    root = Path(root)
    problems: list[Problem] = []

    def add(path, problem: str, note: bool = False) -> None:
        problems.append(Problem(_rel(Path(path), root), problem, note))

    if not root.is_dir():
        return [Problem(str(root), "dataset folder not found")]
    LAYOUTS[detect_layout(root)].check(root, add, image_column=image_column, text_column=text_column,
                                       progress=progress)
    return problems


def faults(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if not p.note]


def format_problems(problems: list[Problem]) -> str:
    """A two-column text table: file | problem (notes marked as such)."""
    if not problems:
        return ""
    width = min(max(len(p.path) for p in problems), 70)
    lines = [f"{'file':<{width}}  problem", f"{'-' * width}  {'-' * 40}"]
    lines += [f"{p.path:<{width}}  {'note: ' if p.note else ''}{p.problem}" for p in problems]
    return "\n".join(lines)
