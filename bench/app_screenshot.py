"""Screenshot of ``lvit app`` for the docs: serve a model, upload an image and its report in headless Chromium
(the system ``chromium``, driven by Playwright), press Segment, save the page as a PNG.

    python bench/app_screenshot.py MODEL_FOLDER_OR_RUN IMAGE "REPORT" docs/app_screenshot.png

Needs ``pip install -e ".[app,test]"`` and Debian's ``chromium``; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--hide-scrollbars"]


def _palette_png(png: bytes) -> bytes:
    """The screenshot as a 256-colour PNG (half the bytes; the page has few colours)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        quantized = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                  dither=Image.Dither.NONE)
    out = io.BytesIO()
    quantized.save(out, format="PNG", optimize=True)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("image")
    parser.add_argument("report")
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=640)
    args = parser.parse_args()
    browser_path = shutil.which("chromium")
    if browser_path is None:
        print("error: chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from lvit.commands.webapp import launch
    from lvit.core.io import atomic_write_bytes

    page = launch(args.model, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, headless=True, args=ARGS)
            tab = browser.new_page(viewport={"width": args.width, "height": args.height})
            tab.goto(page.local_url)
            tab.locator("#upload input[type=file]").set_input_files(args.image)
            textarea = tab.locator("#report textarea")
            if textarea.is_editable():
                textarea.fill(args.report)
            tab.locator("#segment").click()
            tab.locator("#overlay img").wait_for(timeout=120_000)
            tab.locator("#mask-file a[href]").first.wait_for(timeout=30_000)
            tab.wait_for_timeout(500)  # let the images finish fading in
            atomic_write_bytes(args.out, _palette_png(tab.screenshot(full_page=True)))
            print(tab.locator("#status").inner_text())
            browser.close()
    finally:
        page.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
