"""One self-contained HTML page per run: curves, test metrics, best/worst cases with Grad-CAM, config. This module
collects what goes on the page; :mod:`lvit.evaluate.report_page` renders it (one file, everything inlined, so it
opens offline and can be mailed or archived).

Inputs, all optional except ``config.yaml``: ``metrics.csv`` (training curves), and the output of
``lvit test`` (default ``RUN_DIR/test``): ``metrics.json`` (table) and ``per_image.csv`` (case ranking).
The best and worst cases are re-run through the model for their Grad-CAM maps when the run's test data
is reachable; otherwise the page embeds the overlays ``lvit test`` saved, or says what is missing.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..core.errors import DataError, LvitError
from ..core.io import atomic_write_text, refuse_clobber
from .report_page import Case, Figure, ReportContent, render_html

REPORT_NAME = "report.html"
#: Where `lvit test RUN_DIR` writes by default (``RUN_DIR/test-<split>``), then a plain ``RUN_DIR/test``.
TEST_DIRNAMES = ("test-test", "test")
#: Grad-CAM layers of the report's cases: the finest CNN decoder level and the finest ViT level, one per
#: branch. (The finest PLAM gate is often all zero: its positive evidence shows at coarser levels.)
REPORT_LAYERS = ("up.0", "vit_up.0")
#: metrics.json keys holding protocol prose, shown as a note under the table (paths and lists are left out).
_METRIC_PROSE_KEYS = ("paper_metric", "empty_convention")


# --------------------------------------------------------------------------------------------------------
# Collecting the run's files
# --------------------------------------------------------------------------------------------------------
def _flatten(prefix: str, value, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    elif isinstance(value, float):
        out.append((prefix, f"{value:.4f}"))
    elif isinstance(value, (list, tuple)) and len(value) > 8:
        out.append((prefix, f"[{len(value)} values]"))
    else:
        out.append((prefix, str(value)))


def read_test_metrics(test_dir: Path) -> tuple[list[tuple[str, str]], str]:
    """``metrics.json`` -> ((dotted key, formatted value) rows of the numbers, a note of the protocol text);
    ``([], "")`` when absent. Paths and file lists in the JSON are left out of the table."""
    path = test_dir / "metrics.json"
    if not path.is_file():
        return [], ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"unreadable test metrics ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object of metrics")
    rows: list[tuple[str, str]] = []
    _flatten("", {k: v for k, v in data.items() if isinstance(v, (int, float, dict)) or k == "split"}, rows)
    rows = [(k, v) for k, v in rows if not v.startswith("[")]
    prose = " ".join(f"{k.replace('_', ' ')}: {data[k]}." for k in _METRIC_PROSE_KEYS if isinstance(data.get(k), str))
    if isinstance(data.get("model_name"), str):
        rows.insert(0, ("model_name", data["model_name"]))
    return rows, prose


def _column(frame: pd.DataFrame, *names: str) -> str | None:
    lower = {str(c).lower(): c for c in frame.columns}
    for name in names:
        if name in lower:
            return lower[name]
    return None


def rank_cases(per_image_csv: Path, n_cases: int) -> list[tuple[str, str, float, float, dict]]:
    """``per_image.csv`` -> [(rank, name, dice, iou, row)]: the ``n_cases`` best then the ``n_cases`` worst
    images by Dice (images without a ground-truth mask are skipped; an image is never both)."""
    try:
        frame = pd.read_csv(per_image_csv)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(per_image_csv, f"unreadable per-image results ({str(exc).splitlines()[0]})") from None
    name_col = _column(frame, "name", "image", "file", "filename")
    # `lvit test` ranks its overlays by Dice at the original resolution; fall back to the model's.
    dice_col = _column(frame, "dice_original", "dice")
    if name_col is None or dice_col is None:
        raise DataError(per_image_csv, f"needs a name and a dice column (has {', '.join(map(str, frame.columns))})")
    iou_col = _column(frame, "iou_original", "iou", "jaccard")
    frame = frame[pd.to_numeric(frame[dice_col], errors="coerce").notna()].copy()
    frame["_dice"] = pd.to_numeric(frame[dice_col])
    # The order `lvit test` picks its overlays in: ascending (Dice, name); worst first, best from the top.
    frame = frame.sort_values(["_dice", name_col], ascending=[True, True], kind="mergesort")
    worst = frame.head(n_cases)
    best = frame.iloc[::-1]
    best = best[~best.index.isin(worst.index)].head(n_cases)
    out = []
    for rank, part in (("best", best), ("worst", worst)):
        for _, row in part.iterrows():
            iou = float(row[iou_col]) if iou_col is not None and pd.notna(row[iou_col]) else float("nan")
            out.append((rank, str(row[name_col]), float(row["_dice"]), iou, row.to_dict()))
    return out


def _find_saved_overlay(test_dir: Path, name: str) -> Path | None:
    """An overlay `lvit test` saved for ``name`` (``overlays/<best|worst>_<rank>_<stem>_dice<d>.png``)."""
    stem = Path(name).stem
    folder = test_dir / "overlays"
    if not folder.is_dir():
        return None
    for pattern in (f"*_{stem}_dice*.png", f"{stem}.png", f"*{stem}*.png"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def case_figure(image: np.ndarray, truth: np.ndarray | None, probability: np.ndarray, cams: dict[str, np.ndarray],
                threshold: float = 0.5) -> bytes:
    """One row: image, prediction (red) vs ground truth (green outline), then one Grad-CAM per layer. PNG."""
    from ..core.figures import figure_png, image_panel, new_figure
    from ..core.overlays import to_rgb
    from .explanation import heatmap_overlay, mask_overlay

    rgb = to_rgb(image)
    panels = [(rgb, "image"), (mask_overlay(rgb, probability >= threshold, truth), "prediction (red), truth (green)")]
    panels += [(heatmap_overlay(rgb, cam), f"Grad-CAM {layer}") for layer, cam in cams.items()]
    fig = new_figure(2.8 * len(panels), 3.0)
    for i, (picture, title) in enumerate(panels):
        image_panel(fig.add_subplot(1, len(panels), i + 1), picture, title, title_size=8)
    return figure_png(fig)


def _explain_cases(run_dir: Path, cases: list[Case], layers: list[str] | None, threshold: float) -> str:
    """Fill ``case.figure`` with image / overlay / Grad-CAM panels by re-running the model; returns a note
    when that is not possible (the caller then falls back to saved overlays)."""
    from ..data.dataset import load_pair
    from ..data.layout import load_split
    from ..inference import Segmenter
    from ..text import default_cache_dir
    from .gradcam import default_layers, explain_image

    segmenter = Segmenter(run_dir)
    run_config = segmenter.run_config
    root = (run_config.get("data") or {}).get("root") or (run_config.get("data_info") or {}).get("root")
    if not root or not Path(root).is_dir():
        return f"test data {root!r} of this run is not reachable here: Grad-CAM maps are not shown"
    segmenter.cache_dir = default_cache_dir(root)  # the run's own encoded reports
    records = {r.name: r for r in load_split(root, "test")}
    model, encode = segmenter.model, segmenter.encode_text
    if not layers:
        names = dict(model.named_modules())
        layers = [name for name in REPORT_LAYERS if name in names] or default_layers(model)[:1]
    from tqdm import tqdm

    for case in tqdm(cases, desc="report: Grad-CAM", unit="case", leave=False):
        record = records.get(case.name) or records.get(Path(case.name).stem)
        if record is None:
            case.note = f"{case.name} is not in {root}'s test split"
            continue
        image, truth = load_pair(record, model.config.in_channels)
        (expl,) = explain_image(model, image, [record.text], encode, layers)
        case.text = record.text
        case.figure = Figure(case_figure(image, truth, expl.probability, expl.cams, threshold),
                             f"{case.name}: image, prediction vs truth, Grad-CAM of {', '.join(layers)}")
    return ""


def collect_report(run_dir: str | Path, test_dir: str | Path | None = None, n_cases: int = 3,
                   layers: list[str] | None = None, gradcam: bool = True,
                   threshold: float | None = None) -> ReportContent:
    """Read a run folder (and its ``lvit test`` output) into :class:`ReportContent`. ``threshold``: where the
    cases' masks are cut (default: the one their ``lvit test`` scored them at, from its metrics.json; else 0.5)."""
    from .plots import training_curves

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(run_dir, "run folder not found")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise DataError(config_path, "not found (is this a run folder made by lvit train?)")
    config_text = config_path.read_text(encoding="utf-8")
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError as exc:
        raise DataError(config_path, f"unreadable YAML ({str(exc).splitlines()[0]})") from None
    if test_dir is None:
        test_dir = next((run_dir / d for d in TEST_DIRNAMES if (run_dir / d).is_dir()), run_dir / TEST_DIRNAMES[0])
    test_dir = Path(test_dir)
    content = ReportContent(
        title=f"lvit run {run_dir.resolve().name}",
        run_dir=str(run_dir.resolve()),
        generated=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        config_text=config_text,
    )
    model_cfg = config.get("model") or {}
    content.summary = [("model", str(config.get("model_name", "?")))]
    for key in ("image_size", "base_channels", "use_text", "text_dim"):
        if key in model_cfg:
            content.summary.append((f"model.{key}", str(model_cfg[key])))
    encoder = (config.get("text_encoder") or {}).get("spec") or (config.get("text") or {}).get("encoder")
    if encoder and model_cfg.get("use_text", True) and config.get("model_name", "lvit") == "lvit":
        content.summary.append(("text encoder", str(encoder)))
    data_root = (config.get("data") or {}).get("root") or (config.get("data_info") or {}).get("root")
    if data_root:
        content.summary.append(("data", str(data_root)))

    metrics_csv = run_dir / "metrics.csv"
    if metrics_csv.is_file():
        from .plots import read_metrics

        frame = read_metrics(metrics_csv)
        content.summary.append(("epochs logged", str(len(frame))))
        titles = {"loss": "Loss per epoch", "dice": "Dice per epoch", "iou": "IoU per epoch"}
        content.curves = [Figure(png, titles[key]) for key, png in training_curves(metrics_csv).items()]
    else:
        content.curves_note = f"{metrics_csv.name} not found: no training curves"

    content.metrics, content.metrics_note = read_test_metrics(test_dir)
    if not content.metrics:
        content.metrics_note = f"no {test_dir / 'metrics.json'}: run `lvit test {run_dir} --data ROOT` first"

    per_image = test_dir / "per_image.csv"
    if not per_image.is_file():
        content.cases_note = f"no {per_image}: run `lvit test {run_dir} --data ROOT` first"
        return content
    content.cases = [Case(rank, name, dice, iou, text=str(row.get("text", "") or ""))
                     for rank, name, dice, iou, row in rank_cases(per_image, n_cases)]
    note = "Grad-CAM disabled (--no-gradcam)" if not gradcam else ""
    if threshold is None:  # the panels show the masks the listed Dice was scored on
        threshold = float(dict(content.metrics).get("threshold", 0.5))
    if gradcam and content.cases:
        try:
            note = _explain_cases(run_dir, content.cases, layers, threshold)
        except LvitError as exc:
            note = f"Grad-CAM not shown: {exc}"
    for case in content.cases:
        if case.figure is None:
            saved = _find_saved_overlay(test_dir, case.name)
            if saved is not None:
                case.figure = Figure(saved.read_bytes(), f"{case.name}: overlay saved by lvit test ({saved.name})")
            elif not case.note:
                case.note = "no overlay found for this image"
    content.cases_note = note
    return content


def write_report(run_dir: str | Path, out: str | Path | None = None, force: bool = False, **kwargs) -> Path:
    """Build the report of ``run_dir`` and write it atomically (default ``RUN_DIR/report.html``)."""
    from ..artifacts.runs import is_model_folder
    from ..core.errors import ConfigError

    if not out and is_model_folder(run_dir):
        raise ConfigError(f"{run_dir}: a model folder holds only the model (lvit does not write into it): pass "
                          "--out FILE.html")
    out = Path(out) if out else Path(run_dir) / REPORT_NAME
    refuse_clobber(out, force)
    page = render_html(collect_report(run_dir, **kwargs))
    return atomic_write_text(out, page)


__all__ = ["Case", "Figure", "REPORT_NAME", "ReportContent", "TEST_DIRNAMES", "case_figure", "collect_report",
           "rank_cases", "read_test_metrics", "render_html", "write_report"]
