"""The HTML of the run report (``lvit report``): the page's content as dataclasses and its rendering, with
every picture inlined (PNG as base64 ``data:`` URIs, CSS in a ``<style>`` element, no script), so the file opens
from disk in any browser, offline. What goes on the page is collected by :mod:`lvit.evaluate.report`."""

from __future__ import annotations

import base64
import html
import string
from dataclasses import dataclass, field


# --------------------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------------------
@dataclass
class Figure:
    """A PNG to inline, with its caption (also used as alt text)."""

    png: bytes
    caption: str


@dataclass
class Case:
    """One test image shown in the report (ranked by its Dice)."""

    rank: str  # "best" | "worst"
    name: str
    dice: float
    iou: float
    text: str = ""
    figure: Figure | None = None
    note: str = ""


@dataclass
class ReportContent:
    title: str
    run_dir: str
    generated: str
    summary: list[tuple[str, str]] = field(default_factory=list)
    curves: list[Figure] = field(default_factory=list)
    curves_note: str = ""
    metrics: list[tuple[str, str]] = field(default_factory=list)
    metrics_note: str = ""
    cases: list[Case] = field(default_factory=list)
    cases_note: str = ""
    config_text: str = ""


# --------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------
_TEMPLATE = string.Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="lvit report">
<title>$title</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; }
header { background: #1d3557; color: #fff; padding: 18px 28px; }
header h1 { margin: 0 0 4px 0; font-size: 1.5em; }
header p { margin: 0; opacity: 0.85; font-size: 0.9em; }
main { padding: 8px 28px 28px 28px; max-width: 1400px; }
section { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: 12px 18px; margin: 16px 0; }
h2 { font-size: 1.15em; margin: 4px 0 10px 0; }
.figures { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #e4e7ec; }
figcaption { font-size: 0.85em; color: #4a5568; margin-top: 4px; max-width: 1200px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #dde1e7; padding: 4px 10px; text-align: left; }
th { background: #eef1f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.case { border-top: 1px solid #e4e7ec; padding: 10px 0; }
.case h3 { font-size: 1em; margin: 0 0 4px 0; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.8em; color: #fff; }
.best { background: #2a9d8f; } .worst { background: #e76f51; }
.note { color: #6b7280; font-style: italic; }
pre { background: #f1f3f6; padding: 10px; overflow-x: auto; font-size: 0.85em; }
</style>
</head>
<body>
<header>
<h1>$title</h1>
<p>$subtitle</p>
</header>
<main>
<section id="summary">
<h2>Run</h2>
$summary
</section>
<section id="curves">
<h2>Training curves</h2>
$curves
</section>
<section id="metrics">
<h2>Test metrics</h2>
$metrics
</section>
<section id="cases">
<h2>Best and worst test cases</h2>
$cases
</section>
<section id="config">
<h2>Configuration</h2>
$config
</section>
</main>
</body>
</html>
""")


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _img(fig: Figure, max_width: int | None = None) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    style = f' style="max-width: {max_width}px"' if max_width else ""
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(fig.caption)}"{style}>'
            f"<figcaption>{_esc(fig.caption)}</figcaption></figure>")


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    body = "".join(f'<tr><th scope="row">{_esc(k)}</th><td class="num">{_esc(v)}</td></tr>' for k, v in rows)
    head = f"<thead><tr><th>{_esc(header[0])}</th><th>{_esc(header[1])}</th></tr></thead>"
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>' if text else ""


def render_html(content: ReportContent) -> str:
    """The page of ``content`` (every value escaped; images as base64 ``data:`` URIs)."""
    curves = ""
    if content.curves:
        curves = '<div class="figures">' + "".join(_img(f, 560) for f in content.curves) + "</div>"
    metrics = _table(content.metrics, ("metric", "value")) if content.metrics else ""
    cases = []
    for case in content.cases:
        parts = [f'<div class="case"><h3><span class="badge {_esc(case.rank)}">{_esc(case.rank)}</span> '
                 f"{_esc(case.name)} &mdash; Dice {case.dice:.4f}, IoU {case.iou:.4f}</h3>"]
        if case.text:
            parts.append(f"<p>Report: <q>{_esc(case.text)}</q></p>")
        if case.figure is not None:
            parts.append(_img(case.figure))
        parts.append(_note(case.note))
        parts.append("</div>")
        cases.append("".join(parts))
    config = f"<pre>{_esc(content.config_text)}</pre>" if content.config_text else ""
    return _TEMPLATE.substitute(
        title=_esc(content.title),
        subtitle=_esc(f"{content.run_dir} \u00b7 generated {content.generated}"),
        summary=_table(content.summary, ("item", "value")) if content.summary else _note("no run summary"),
        curves=curves + _note(content.curves_note),
        metrics=metrics + _note(content.metrics_note),
        cases="".join(cases) + _note(content.cases_note),
        config=config or _note("config.yaml not found"),
    )
