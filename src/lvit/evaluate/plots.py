"""Training curves from a run's ``metrics.csv``: loss, Dice and IoU per epoch, as PNG bytes.

``metrics.csv`` has one row per epoch (columns such as ``epoch, train_loss, val_loss, val_dice, val_iou,
lr``). Rows written by a step-level logger (several rows per epoch, NaN where a column was not logged) are
folded to the last value of each column per epoch, so either layout plots the same.

Figures use matplotlib's object API on an Agg canvas (no pyplot global state, no display needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import DataError

#: Curve groups, in display order: (key, title, y-label, column filter on the lower-cased column name).
CURVE_GROUPS = (
    ("loss", "Loss", "loss", lambda col: "loss" in col),
    ("dice", "Dice", "Dice", lambda col: "dice" in col),
    ("iou", "IoU", "IoU", lambda col: "iou" in col or "jaccard" in col),
)


def read_metrics(path: str | Path) -> pd.DataFrame:
    """``metrics.csv`` -> one row per epoch, indexed by epoch (1-based when the file has no epoch column)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "metrics file not found (a run folder holds metrics.csv after training)")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read as CSV ({str(exc).splitlines()[0]})") from None
    if frame.empty:
        raise DataError(path, "has no rows (no epoch finished yet?)")
    numeric = frame.apply(pd.to_numeric, errors="coerce")
    if "epoch" in numeric.columns:
        numeric = numeric.dropna(subset=["epoch"])
        # groupby().last() takes the last non-NaN value of each column: step rows and epoch rows merge.
        numeric = numeric.groupby("epoch", sort=True).last()
    else:
        numeric.index = pd.RangeIndex(1, len(numeric) + 1, name="epoch")
    numeric = numeric.dropna(axis=1, how="all")
    if numeric.empty:
        raise DataError(path, "has no numeric columns to plot")
    return numeric


def curve_columns(frame: pd.DataFrame) -> dict[str, list[str]]:
    """Group the columns of :func:`read_metrics` into the curve groups that have any (``{"loss": [...], ...}``)."""
    groups = {}
    for key, _title, _ylabel, wanted in CURVE_GROUPS:
        cols = [c for c in frame.columns if wanted(str(c).lower())]
        if cols:
            groups[key] = cols
    return groups


def _figure_png(draw, width: float = 5.0, height: float = 3.2, dpi: int = 110) -> bytes:
    from ..core.figures import figure_png, new_figure

    fig = new_figure(width, height, dpi)
    draw(fig)
    return figure_png(fig)


def plot_curve(frame: pd.DataFrame, columns: list[str], title: str, ylabel: str) -> bytes:
    """One line per column against the epoch; the best epoch of a validation Dice/IoU is marked. PNG bytes."""

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        epochs = np.asarray(frame.index, dtype=float)
        for col in columns:
            values = frame[col].to_numpy(dtype=float)
            ok = np.isfinite(values)
            if not ok.any():
                continue
            marker = "o" if ok.sum() <= 30 else None
            ax.plot(epochs[ok], values[ok], marker=marker, markersize=3, label=str(col))
            if str(col).lower().startswith("val") and "loss" not in str(col).lower():
                best = int(np.nanargmax(np.where(ok, values, -np.inf)))
                ax.scatter([epochs[best]], [values[best]], s=40, facecolors="none", edgecolors="black", zorder=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)

    return _figure_png(draw)


def training_curves(metrics_csv: str | Path) -> dict[str, bytes]:
    """``metrics.csv`` -> ``{"loss": png, "dice": png, "iou": png}`` for the groups the file has."""
    frame = read_metrics(metrics_csv)
    groups = curve_columns(frame)
    if not groups:
        raise DataError(metrics_csv, f"no loss, Dice or IoU column (columns: {', '.join(map(str, frame.columns))})")
    titles = {key: (title, ylabel) for key, title, ylabel, _ in CURVE_GROUPS}
    return {key: plot_curve(frame, cols, *titles[key]) for key, cols in groups.items()}


__all__ = ["CURVE_GROUPS", "curve_columns", "plot_curve", "read_metrics", "training_curves"]
