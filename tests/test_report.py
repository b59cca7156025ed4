"""`lvit report`: training curves, the self-contained HTML page, and the page rendered in headless Chromium."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_gradcam import tiny_run  # the shared tiny trained run (tests/ is on sys.path)

from lvit.commands.cli import main as lvit_main
from lvit.core.errors import DataError, OutputExistsError
from lvit.evaluate.plots import read_metrics, training_curves
from lvit.evaluate.report import Case, Figure, ReportContent, collect_report, render_html, write_report

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class PageChecker(HTMLParser):
    """Collects tags, checks nesting (every non-void element closed, in order) and every URL attribute."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.urls: list[str] = []
        self.images: list[dict] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for key in ("src", "href", "action", "poster", "data"):
            if attrs.get(key):
                self.urls.append(attrs[key])
        if tag == "img":
            self.images.append(attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else 'nothing'}>")
            return
        self.stack.pop()


def check_page(page: str) -> PageChecker:
    assert page.startswith("<!DOCTYPE html>")
    checker = PageChecker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert not checker.stack, f"unclosed: {checker.stack}"
    for tag in ("html", "head", "body", "main", "title"):
        assert checker.counts.get(tag) == 1, tag
    # Self-contained: no URL leaves the file (images are data: URIs), no external script or stylesheet.
    assert all(url.startswith("data:image/png;base64,") or url.startswith("#") for url in checker.urls), \
        [u[:60] for u in checker.urls if not u.startswith("data:")]
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.IGNORECASE)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    return checker


def _png(width=40, height=30, value=None) -> bytes:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (height, width, 3), dtype=np.uint8) if value is None else \
        np.full((height, width, 3), value, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def report_page(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert lvit_main(["report", str(run_dir), "--out", str(out), "--cases", "1"]) == 0
    return out


# ---------------------------------------------------------------------------------------------- curves
def test_read_metrics_folds_step_rows(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,step,train_loss,val_loss,val_dice,val_iou\n"
                        "0,1,0.9,,,\n0,2,0.8,,,\n0,2,,0.85,0.40,0.25\n"
                        "1,3,0.6,,,\n1,4,0.5,,,\n1,4,,0.55,0.60,0.43\n")
    frame = read_metrics(csv_path)
    assert list(frame.index) == [0, 1]
    assert frame.loc[1, "train_loss"] == 0.5 and frame.loc[1, "val_dice"] == 0.60
    pngs = training_curves(csv_path)
    assert set(pngs) == {"loss", "dice", "iou"}
    for png in pngs.values():
        with Image.open(io.BytesIO(png)) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_read_metrics_errors(tmp_path):
    with pytest.raises(DataError, match="metrics.csv"):
        read_metrics(tmp_path / "metrics.csv")
    (tmp_path / "metrics.csv").write_text("epoch,lr\n")
    with pytest.raises(DataError, match="no rows"):
        read_metrics(tmp_path / "metrics.csv")
    (tmp_path / "metrics.csv").write_text("epoch,lr\n1,0.1\n")
    with pytest.raises(DataError, match="no loss, Dice or IoU"):
        training_curves(tmp_path / "metrics.csv")


# ---------------------------------------------------------------------------------------------- HTML
def test_render_html_escapes_and_inlines():
    content = ReportContent(
        title="run <x>", run_dir="/runs/a&b", generated="now",
        summary=[("model", "lvit")], curves=[Figure(_png(), "Loss per epoch")],
        metrics=[("dice", "0.8000")],
        cases=[Case("best", "img_<1>.png", 0.9, 0.8, text='left "lung" <b>', figure=Figure(_png(), "case"))],
        config_text="model_name: lvit\nnote: <script>alert(1)</script>\n",
    )
    page = render_html(content)
    checker = check_page(page)
    assert len(checker.images) == 2
    assert "run &lt;x&gt;" in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert {"summary", "curves", "metrics", "cases", "config"} <= checker.ids
    assert all(img.get("alt") for img in checker.images)


def test_report_of_a_run_without_test_output(run_dir, tmp_path):
    bare = tmp_path / "bare_run"
    bare.mkdir()
    for name in ("config.yaml", "metrics.csv"):
        shutil.copy(run_dir / name, bare / name)
    page = render_html(collect_report(bare))
    checker = check_page(page)
    assert len(checker.images) == 3  # loss, Dice, IoU curves
    assert "run `lvit test" in page
    with pytest.raises(DataError, match="config.yaml"):
        collect_report(tmp_path)


def test_report_of_trained_run(run_dir, report_page, capsys):
    page = report_page.read_text(encoding="utf-8")
    checker = check_page(page)
    alts = [img["alt"] for img in checker.images]
    assert sum("per epoch" in a for a in alts) == 3
    # One best and one worst case, each re-run through the model with Grad-CAM of both branches.
    cams = [a for a in alts if "Grad-CAM of up.0, vit_up.0" in a]
    assert len(cams) == 2, alts
    metrics = json.loads((run_dir / "test-test" / "metrics.json").read_text())
    assert f"{metrics['dice']:.4f}" in page and "mean_over_images.dice" in page
    assert "model_name: lvit" in page  # the config section
    # Refuses to overwrite; --force does.
    assert lvit_main(["report", str(run_dir), "--out", str(report_page), "--no-gradcam"]) == 2
    assert "--force" in capsys.readouterr().err
    with pytest.raises(OutputExistsError):
        write_report(run_dir, report_page)
    assert lvit_main(["report", str(run_dir), "--out", str(report_page), "--force", "--no-gradcam",
                      "--cases", "1"]) == 0
    checker = check_page(report_page.read_text(encoding="utf-8"))
    # Without Grad-CAM the cases show the overlays `lvit test` saved.
    assert sum("overlay saved by lvit test" in img["alt"] for img in checker.images) == 2
    report_page.unlink()  # leave the module fixture's page as the next test expects: rebuilt below
    assert lvit_main(["report", str(run_dir), "--out", str(report_page), "--cases", "1"]) == 0


# ---------------------------------------------------------------------------------------------- browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


PROBE = """<script>
window.addEventListener('load', function () {
  var rows = [];
  document.querySelectorAll('img').forEach(function (img, i) {
    var box = img.getBoundingClientRect();
    rows.push([i, img.complete ? 1 : 0, img.naturalWidth, img.naturalHeight, Math.round(box.width),
               Math.round(box.height)].join(','));
  });
  var out = document.createElement('pre');
  out.id = 'lvit-probe';
  out.textContent = rows.join(';');
  document.body.appendChild(out);
});
</script>"""


def _chromium_args(binary: str, profile: Path) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}"]


def test_report_renders_in_headless_chromium(report_page, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    page = report_page.read_text(encoding="utf-8")
    n_images = page.count("<img ")
    # The report has no script; a copy with a probe script records what the browser laid out.
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "\n</body>"), encoding="utf-8")
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run(_chromium_args(binary, tmp_path / "profile1") + [
        "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120, env=env)
    match = re.search(r'<pre id="lvit-probe">([^<]*)</pre>', dom.stdout)
    assert match, f"no probe output from chromium (rc {dom.returncode}): {dom.stderr[-500:]}"
    rows = [list(map(int, row.split(","))) for row in match.group(1).split(";") if row]
    assert len(rows) == n_images >= 5
    for index, complete, natural_w, natural_h, shown_w, shown_h in rows:
        assert complete and natural_w > 0 and natural_h > 0, f"image {index} did not decode"
        assert shown_w > 50 and shown_h > 20, f"image {index} is laid out at {shown_w}x{shown_h}"

    shot = tmp_path / "report_screenshot.png"
    subprocess.run(_chromium_args(binary, tmp_path / "profile2") + [
        f"--screenshot={shot}", "--window-size=1280,2400", report_page.as_uri()],
        capture_output=True, text=True, timeout=120, env=env)
    assert shot.is_file(), "chromium wrote no screenshot"
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels.std() > 10  # not a blank page: header, text and pictures


def test_case_panels_are_cut_at_the_threshold_their_test_scored_them_at(run_dir, tmp_path, monkeypatch):
    import json

    import lvit.evaluate.report as report

    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    test_dir = next(p for p in run.iterdir() if p.is_dir() and (p / "metrics.json").is_file())
    metrics = json.loads((test_dir / "metrics.json").read_text())
    (test_dir / "metrics.json").write_text(json.dumps({**metrics, "threshold": 0.35}))
    seen = []
    monkeypatch.setattr(report, "_explain_cases", lambda run_dir, cases, layers, threshold: seen.append(threshold)
                        or "")
    collect_report(run, test_dir=test_dir, n_cases=1)
    collect_report(run, test_dir=test_dir, n_cases=1, threshold=0.6)
    assert seen == [0.35, 0.6]
