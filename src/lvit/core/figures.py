"""Matplotlib figures rendered to PNG bytes, one way for every picture lvit draws (curves, Grad-CAM panels, the
report's cases, the benchmarks' examples): the Agg canvas (no display, no global pyplot state), tight layout,
and the panel title size."""

from __future__ import annotations

import io

PANEL_TITLE_SIZE = 9  # points: titles above image panels
NOTE_SIZE = 8  # points: captions and notes inside a figure


def new_figure(width: float, height: float, dpi: int = 100):
    """A matplotlib Figure of ``width`` x ``height`` inches drawn on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    """The figure, laid out tightly, as PNG bytes."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def image_panel(ax, picture, title: str, cmap=None, title_size: float = PANEL_TITLE_SIZE, **imshow) -> None:
    """``picture`` in ``ax`` under ``title``, without axes."""
    ax.imshow(picture, cmap=cmap, **imshow)
    ax.set_title(title, fontsize=title_size)
    ax.set_axis_off()
