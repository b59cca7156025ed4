"""Pictures and files of a Grad-CAM explanation (:mod:`lvit.evaluate.gradcam` computes it): heat-map and mask
overlays, the text-attribution figure (the same image under two reports), and the folder `lvit explain` writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.overlays import GT_COLOR, PRED_COLOR, contour, default_thickness, to_rgb
from .gradcam import Explanation


def heatmap_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] map ``cam`` (HxW) over ``image`` (HxW[xC] uint8) with a colormap -> HxWx3 uint8."""
    from matplotlib import colormaps

    rgb = to_rgb(image).astype(np.float32)
    if cam.shape != rgb.shape[:2]:
        raise ValueError(f"map {cam.shape} and image {rgb.shape[:2]} differ in size")
    colours = colormaps[cmap](np.clip(cam, 0, 1))[..., :3] * 255.0  # HxWx3
    return np.clip((1 - alpha) * rgb + alpha * colours, 0, 255).astype(np.uint8)


def mask_overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None,
                 alpha: float = 0.4) -> np.ndarray:
    """Prediction (HxW bool) filled red over ``image``; ground truth (if given) as the green contour that
    `lvit test` overlays draw -> HxWx3 uint8. (Filled, not outlined: a heat map sits beside it and small
    predictions stay visible when the figure is shown scaled down.)"""
    rgb = to_rgb(image).astype(np.float32)
    pred = pred.astype(bool)
    rgb[pred] = (1 - alpha) * rgb[pred] + alpha * np.array(PRED_COLOR, np.float32)
    if truth is not None:
        rgb[contour(truth, default_thickness(rgb.shape))] = GT_COLOR
    return rgb.astype(np.uint8)


def layer_file_name(layer: str) -> str:
    """``up.0.attention`` -> ``cam_up.0.attention.png`` (module names hold only identifier characters and dots)."""
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in layer)
    return f"cam_{safe}.png"




def text_attribution_figure(image: np.ndarray, texts: tuple[str, str], explanations: tuple[Explanation, Explanation],
                            layer: str, threshold: float = 0.5) -> bytes:
    """One PNG: for each report a row (image, prediction, Grad-CAM of ``layer``), and on the right the
    difference of the probability maps (report 1 minus report 2), so the effect of the text is visible."""
    import textwrap

    from ..core.figures import figure_png, image_panel, new_figure

    rgb = to_rgb(image)
    fig = new_figure(13.5, 7.0)
    grid = fig.add_gridspec(2, 4, width_ratios=(1, 1, 1, 1.15))
    for row, (text, expl) in enumerate(zip(texts, explanations)):
        pred = expl.probability >= threshold
        panels = (
            (rgb, "image"),
            (mask_overlay(rgb, pred), f"prediction ({100 * pred.mean():.1f}% of pixels)"),
            (heatmap_overlay(rgb, expl.cams[layer]), f"Grad-CAM {layer}"),
        )
        for col, (picture, title) in enumerate(panels):
            image_panel(fig.add_subplot(grid[row, col]), picture, title)
        label = "report" if row == 0 else "changed report"
        # The report under its row, left-aligned across the three panels.
        fig.axes[row * 3].text(0.0, -0.04, f"{label}: " + "\n".join(textwrap.wrap(text, 110)[:2]),
                               transform=fig.axes[row * 3].transAxes, va="top", ha="left", fontsize=8.5,
                               clip_on=False)
    ax = fig.add_subplot(grid[:, 3])
    diff = explanations[0].probability - explanations[1].probability
    limit = max(float(np.abs(diff).max()), 1e-3)
    shown = ax.imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_title(f"P(report) - P(changed report)\nmean |diff| {float(np.abs(diff).mean()):.3g}, "
                 f"max {float(np.abs(diff).max()):.3g}", fontsize=9)
    ax.set_axis_off()
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    return figure_png(fig)


def write_explanation(out_dir: str | Path, image: np.ndarray, texts: tuple[str, str],
                      explanations: tuple[Explanation, Explanation], threshold: float = 0.5,
                      figure_layer: str | None = None, extra: dict | None = None) -> dict:
    """Save the heat-map overlays of the real report (``cam_<layer>.png``), the prediction overlay, the
    probability map, the changed report's overlays (``alt/``) and ``text_attribution.png``; return a summary."""
    from ..core.io import atomic_write_bytes, atomic_write_json, save_png

    out_dir = Path(out_dir)
    rgb = to_rgb(image)
    files = []
    for sub, expl in (("", explanations[0]), ("alt", explanations[1])):
        folder = out_dir / sub if sub else out_dir
        for layer, cam in expl.cams.items():
            files.append(save_png(folder / layer_file_name(layer), heatmap_overlay(rgb, cam)))
        files.append(save_png(folder / "prediction.png", mask_overlay(rgb, expl.probability >= threshold)))
        files.append(save_png(folder / "probability.png", np.round(expl.probability * 255).astype(np.uint8)))
    layer = figure_layer or next(iter(explanations[0].cams))
    files.append(atomic_write_bytes(out_dir / "text_attribution.png",
                                    text_attribution_figure(image, texts, explanations, layer, threshold)))
    diff = explanations[0].probability - explanations[1].probability
    summary = {
        "image_size": list(image.shape[:2]),
        "layers": list(explanations[0].cams),
        "report": texts[0],
        "changed_report": texts[1],
        "threshold": threshold,
        "foreground_fraction": float((explanations[0].probability >= threshold).mean()),
        "changed_foreground_fraction": float((explanations[1].probability >= threshold).mean()),
        "mean_abs_probability_change": float(np.abs(diff).mean()),
        "max_abs_probability_change": float(np.abs(diff).max()),
        "score": explanations[0].score,
        # Grad-CAM keeps only positive evidence: an all-zero map means no channel mix of that layer
        # supports the predicted region (common for gates such as PLAM), not a failure.
        "empty_maps": [layer for layer, cam in explanations[0].cams.items() if not cam.any()],
        "files": sorted(str(Path(f).relative_to(out_dir)) for f in files),
        **(extra or {}),
    }
    atomic_write_json(out_dir / "explain.json", summary)
    return summary
