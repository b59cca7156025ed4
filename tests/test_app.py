"""``lvit app``: the work behind the page (bad uploads are sentences, DICOM and misnamed files are read, the mask
file has the image's size), the one-line error without Gradio, and the page itself in headless Chromium (system
``chromium`` driven by Playwright; no browser download): it loads, an upload gives a mask, a bad upload a message.
"""

from __future__ import annotations

import io
import shutil
import struct
import sys
import zlib
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from files import write_dicom
from PIL import Image

from lvit.core.errors import ConfigError
from lvit.models import LViTConfig, build_model

TINY = dict(image_size=32, base_channels=8, text_dim=8, text_tokens=6, vit_heads=2)
REPORT = "Left lung: one infected area in the lower zone."


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A text-free model folder (LViT-T) with seeded weights whose mask is not empty on the test image."""
    torch.manual_seed(0)
    model = build_model("lvit-t", LViTConfig(**TINY)).eval()
    with torch.no_grad():
        model.head.bias.fill_(0.0)
        model.head.weight.mul_(5.0)  # a visible, image-dependent mask from untrained weights
    return model.save_pretrained(tmp_path_factory.mktemp("app") / "lvit-t-tiny")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    """A text-guided run folder (learned text backend: no transformers needed)."""
    from lvit.artifacts.runs import save_weights, write_run_config
    from lvit.text import get_text_encoder

    run = tmp_path_factory.mktemp("app_text") / "run"
    (run / "checkpoints").mkdir(parents=True)
    encoder = get_text_encoder("learned", 6, texts=[REPORT, "Right lung: two infected areas."], dim=8)
    encoder.save(run / "vocab.json")
    torch.manual_seed(0)
    write_run_config(run, {"model_name": "lvit", "model": LViTConfig(**TINY).to_dict(),
                           "text_encoder": {**encoder.describe(), "spec": "learned:vocab.json"}})
    save_weights(run / "checkpoints" / "best.safetensors", build_model("lvit", LViTConfig(**TINY)).eval(),
                 encoder.build_module(8, seed=0))
    return run


def _xray(path: Path, h: int = 72, w: int = 60) -> Path:
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = (120 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` (no pixel data): the 'decompression bomb' shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


# --------------------------------------------------------------------------------------------------
# The work behind the page (no Gradio needed)


def test_segmenter_gives_mask_probabilities_and_gradcam_at_the_image_size(model_folder, tmp_path):
    from lvit.commands.webapp import Page

    seg = Page(model_folder, work_dir=tmp_path / "work")
    assert not seg.reads_text and seg.layer == "up.0"
    result = seg.segment(str(_xray(tmp_path / "x.png")), "", 0.5)
    assert result.ok, result.message
    assert result.overlay.shape == result.probability.shape == result.gradcam.shape == (72, 60, 3)
    mask = np.array(Image.open(result.mask_file))
    assert mask.shape == (72, 60) and set(np.unique(mask)) <= {0, 255}
    assert f"{int((mask > 0).sum()):,} pixels" in result.message
    # DICOM, with and without its extension (uploads lose names), gives the same kind of result.
    pixels = (np.arange(64 * 48).reshape(64, 48) * 7 % 4000).astype(np.uint16)
    for name in ("scan.dcm", "scan_without_extension"):
        result = seg.segment(str(write_dicom(tmp_path / name, pixels)), None, 0.5)
        assert result.ok and result.overlay.shape == (64, 48, 3), result.message
    # A report given to a text-free model is noted, not an error.
    assert "does not read reports" in " ".join(seg.segment(str(tmp_path / "x.png"), REPORT, 0.5).notes)
    assert not list((tmp_path / "work").glob("upload-*"))  # the renamed views of uploads are gone
    seg.close()
    assert (tmp_path / "work").is_dir()  # a folder the caller named is kept


def test_the_page_cuts_at_the_models_own_threshold_unless_the_slider_moves(model_folder, tmp_path):
    import json
    import shutil

    from lvit.commands.webapp import Page

    folder = Path(shutil.copytree(model_folder, tmp_path / "folder"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "threshold": {"threshold": 0.35, "split": "val",
                                                                            "n_images": 9}}))
    seg = Page(folder, work_dir=tmp_path / "work")
    assert seg.segmenter.threshold == 0.35
    xray = str(_xray(tmp_path / "x.png"))
    own, at_05 = seg.segment(xray, ""), seg.segment(xray, "", 0.5)
    assert "above probability 0.35" in own.message and "above probability 0.5" in at_05.message
    own_mask, mask_05 = (np.array(Image.open(r.mask_file)) > 0 for r in (own, at_05))
    assert own_mask.sum() > mask_05.sum() and not (mask_05 & ~own_mask).any()
    seg.close()


def test_the_segmenters_own_temporary_folder_goes_with_it(model_folder, tmp_path):
    from lvit.commands.webapp import Page

    seg = Page(model_folder)
    assert seg.segment(str(_xray(tmp_path / "x.png")), "", 0.5).ok
    folder = seg.work_dir
    assert any(folder.rglob("*_mask.png"))
    seg.close()
    assert not folder.exists()


def test_bad_uploads_are_sentences_not_tracebacks(model_folder, tmp_path, monkeypatch):
    import lvit.commands.webapp
    from lvit.commands.webapp import Page

    seg = Page(model_folder, work_dir=tmp_path / "work")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "fake.png").write_text("not a png either")
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {
        None: "Upload a chest X-ray first",
        tmp_path / "notes.txt": "not an image lvit reads",
        tmp_path / "fake.png": "fake.png: unreadable or truncated image",
        tmp_path / "empty.png": "empty (0 bytes)",
        _png_header_only(tmp_path / "big.png", 12000, 6000): "too large (72 megapixels",
        _png_header_only(tmp_path / "bomb.png", 30000, 30000): "absurd image size, refused before decoding",
        _png_header_only(tmp_path / "sliver.png", 4, 4000): "absurd image size 4x4000",
    }
    for path, message in cases.items():
        result = seg.segment(None if path is None else str(path), "", 0.5)
        assert not result.ok and message in result.message, (path, result.message)
        assert "Traceback" not in result.message and str(tmp_path) not in result.message
    monkeypatch.setattr(lvit.commands.webapp, "MAX_UPLOAD_MB", 0.001)
    assert "too large (0 MB" in seg.segment(str(_xray(tmp_path / "x.png")), "", 0.5).message
    assert "between 0 and 1" in seg.segment(str(tmp_path / "x.png"), "", 1.5).message


def test_text_models_need_the_report_and_the_report_writer_hook_fills_it(text_run, tmp_path):
    from lvit.commands.webapp import Page

    image = str(_xray(tmp_path / "x.png"))
    seg = Page(text_run, work_dir=tmp_path / "work")
    assert seg.reads_text
    assert "reads the report" in seg.segment(image, "  ", 0.5).message
    result = seg.segment(image, "left lung, lower zone", 0.5)
    assert result.ok and not result.notes, (result.message, result.notes)
    assert seg.segment(image, REPORT, 0.5).notes == [
        "The report is long: the model reads its first 6 of 11 tokens (word pieces)."]
    assert any("far from the training reports" in n for n in seg.segment(image, "xyzzy plugh", 0.5).notes)
    assert seg.write_report(image) == ("", "No report writer for this model (lvit train-reporter): type the report.")
    seg.report_writer = lambda pixels: f"left lung, {pixels.shape[1]}x{pixels.shape[0]} image"
    assert seg.write_report(image)[0] == "left lung, 60x72 image"
    # an empty box with a writer: the writer's report is read (as lvit predict without --text), and said so
    written = seg.segment(image, "  ", 0.5)
    typed = seg.segment(image, "left lung, 60x72 image", 0.5)
    assert written.ok and np.array_equal(written.overlay, typed.overlay)
    assert written.notes == ['No report: the report writer wrote "left lung, 60x72 image" from the image and the '
                             "model read it; a true report usually gives a better mask."]


def test_lvit_app_without_gradio_is_one_line(model_folder, monkeypatch, capsys):
    from lvit.commands.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["app", str(model_folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'error: lvit app needs Gradio, an optional dependency: pip install -e ".[app]"'


# --------------------------------------------------------------------------------------------------
# The page in headless Chromium


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed (Debian package 'chromium'; .ci/run installs it)")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::Warning:gradio")  # pandas deprecations inside Gradio's queue
def test_the_page_in_headless_chromium(model_folder, tmp_path):
    binary = _chromium()
    pytest.importorskip("gradio", reason="Gradio is not installed (pip install -e \".[app]\")")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright is not installed (pip install -e \".[test]\")")
    from lvit.commands.webapp import launch

    page = launch(model_folder, block=False)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=binary, headless=True, args=CHROMIUM_ARGS)
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.goto(page.local_url)
            assert "lvit: try LViT-T" in tab.locator("h2").first.inner_text()
            status = tab.locator("#status")
            assert "Waiting for an image" in status.inner_text()
            upload = tab.locator("#upload input[type=file]")

            # An upload gives a mask over the image (decoded by the browser) and the mask file to download.
            upload.set_input_files(str(_xray(tmp_path / "chest.png")))
            tab.locator("#segment").click()
            overlay = tab.locator("#overlay img")
            overlay.wait_for(timeout=20_000)
            assert tab.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle(),
                                         timeout=10_000)
            assert overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [60, 72]
            link = tab.locator("#mask-file a[href]").first
            link.wait_for(timeout=10_000)
            assert "chest_mask" in tab.locator("#mask-file").inner_text()
            served = tab.request.get(link.get_attribute("href"))  # what the download link gives
            assert served.ok
            with Image.open(io.BytesIO(served.body())) as mask:
                assert mask.size == (60, 72) and set(np.unique(np.array(mask))) <= {0, 255}
            assert "60 x 72 image" in status.inner_text()
            tab.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            # A bad upload: a message on the page, no traceback.
            (tmp_path / "notes.txt").write_text("not an image")
            tab.locator("#upload button[aria-label='Clear']").click()
            upload.set_input_files(str(tmp_path / "notes.txt"))
            tab.locator("#segment").click()
            tab.wait_for_function("() => document.querySelector('#status').innerText.includes('Could not segment')",
                                  timeout=20_000)
            text = status.inner_text()
            assert "notes.txt is not an image lvit reads" in text and "Traceback" not in tab.content()
            browser.close()
        port = urlparse(page.local_url).port  # a second page on the same port: one line, not Gradio's trace
        with pytest.raises(ConfigError, match=f"cannot serve on 127.0.0.1:{port}"):
            launch(model_folder, port=port, block=False)
    finally:
        page.close()
    assert (tmp_path / "page.png").stat().st_size > 10_000
