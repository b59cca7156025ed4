"""``lvit app``: a web page (Gradio) to try a model on one chest X-ray.

Upload an image (PNG, JPEG, DICOM, also BMP/TIFF/NIfTI), type its report (text-guided models), press *Segment*:
the page shows the predicted mask over the image, the probability map and a Grad-CAM heat map (one decoder layer,
:mod:`lvit.evaluate.gradcam`), and offers the mask as a PNG download. A bad upload (not an image, empty, too
large, an absurd size) or a missing report is a message on the page, never a traceback. One image is processed
at a time; concurrent users wait in Gradio's queue.

Gradio is optional (``pip install -e ".[app]"``) and imported only by :func:`build_app`; :class:`Page` (the work
behind the page, over :class:`lvit.inference.Segmenter`) needs only lvit, so it is tested without a browser too.
Nothing here reaches the network: Gradio's analytics are off, the page uses system fonts, and the model loads from
a local folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, LvitError

MAX_UPLOAD_MB = 50  # larger uploads get a message; Gradio itself refuses anything over 4x this
MAX_PIXELS = 50_000_000  # checked from the file header, before decoding (a 16384 x 16384 PNG is 268 Mpx)
APP_EXTRA = 'pip install -e ".[app]"'
GRADCAM_LAYERS = ("up.0", "up.1")  # the finest decoder level (LViT and U-Net both have it)
IMAGE_HEIGHT = 300  # px on the page
# Small images (a 128 px model input) are scaled up on the page, pixels kept sharp; the files keep their size.
PAGE_CSS = (".lvit-view img { width: 100% !important; height: 100% !important; object-fit: contain; "
            "image-rendering: pixelated; }")

#: REPORT WRITER HOOK: ``image HxWxC uint8 -> report``. Given to :class:`Page` (``report_writer=``, or
#: :func:`launch`), the page shows a "Write the report from the image" button that fills the report box. ``lvit app``
#: gives it the run's report writer (``lvit train-reporter``) when there is one; without it the button is hidden.
ReportWriter = Callable[[np.ndarray], str]


@dataclass
class Result:
    """What one click on *Segment* shows: images (HxWx3 uint8) or None, the mask PNG path, and a message."""

    message: str
    overlay: np.ndarray | None = None
    probability: np.ndarray | None = None
    gradcam: np.ndarray | None = None
    mask_file: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.overlay is not None


def _sniff_suffix(head: bytes) -> str | None:
    """The image type from the first bytes of a file (uploads often lose or misname their extension)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return ".dcm"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return ".tif"
    if head.startswith(b"BM"):
        return ".bmp"
    return None


class Page:
    """The work behind the page: ``segment(upload_path, report, threshold) -> Result``; never raises for bad input.
    ``source``: a :class:`lvit.inference.Segmenter` or what one is built from (run, model folder, shipped name)."""

    def __init__(self, source, device: str = "cpu", layer: str | None = None,
                 report_writer: ReportWriter | None = None, work_dir: str | Path | None = None):
        from ..evaluate.gradcam import default_layers
        from ..inference import Segmenter

        self.segmenter = source if isinstance(source, Segmenter) else Segmenter(source, device=device)
        self.source = Path(self.segmenter.source)
        model = self.segmenter.model
        names = dict(model.named_modules())
        self.layer = layer or next((n for n in GRADCAM_LAYERS if n in names), None) or default_layers(model)[0]
        if self.layer not in names:
            raise ConfigError(f"--layer {self.layer}: not a layer of this model (see lvit explain RUN --list-layers)")
        self.report_writer = report_writer
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="lvit-app-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # A temporary folder of our own goes when the segmenter does (close(), garbage collection or exit);
        # a folder the caller named is theirs to keep.
        self._cleanup = (weakref.finalize(self, shutil.rmtree, str(self.work_dir), True) if work_dir is None
                         else None)

    def close(self) -> None:
        """Remove the temporary folder of uploads and mask files (when the segmenter made it)."""
        if self._cleanup is not None:
            self._cleanup()

    @property
    def reads_text(self) -> bool:
        return self.segmenter.uses_text

    @property
    def title(self) -> str:
        return self.segmenter.title

    # ---------------------------------------------------------------------------------------------
    def read_upload(self, path: str | Path | None) -> np.ndarray:
        """The uploaded file as ``HxWxC`` uint8; :class:`LvitError` with a sentence for the page otherwise."""
        from ..data import read_image
        from ..data.readers import IMAGE_SUFFIXES, suffix_of

        if not path:
            raise LvitError("Upload a chest X-ray first (PNG, JPEG or DICOM).")
        path = Path(path)
        name = path.name
        try:
            size = path.stat().st_size
        except OSError:
            raise LvitError(f"{name}: the upload did not arrive; try again.") from None
        if size == 0:
            raise LvitError(f"{name} is empty (0 bytes): upload the image file itself.")
        if size > MAX_UPLOAD_MB * 1024 * 1024:
            raise LvitError(f"{name} is too large ({size / 1024 / 1024:.0f} MB; this page takes up to "
                            f"{MAX_UPLOAD_MB} MB). Use `lvit predict` for very large files.")
        with open(path, "rb") as fh:
            head = fh.read(132)
        sniffed = _sniff_suffix(head)
        suffix = suffix_of(path)
        if sniffed is None and suffix not in IMAGE_SUFFIXES:
            raise LvitError(f"{name} is not an image lvit reads (PNG, JPEG, DICOM, BMP, TIFF or NIfTI).")
        if sniffed is not None and sniffed != suffix and not (sniffed == ".jpg" and suffix == ".jpeg") \
                and not (sniffed == ".tif" and suffix == ".tiff"):
            link = self.work_dir / f"upload-{uuid.uuid4().hex}{sniffed}"  # read it as what it is: no copy
            os.symlink(path.resolve(), link)
            path = link
        try:
            pixels = _header_pixels(path)
            if pixels is not None and pixels > MAX_PIXELS:
                raise LvitError(f"{name} is too large ({pixels / 1e6:.0f} megapixels; this page takes up to "
                                f"{MAX_PIXELS / 1e6:.0f}). Use `lvit predict` for very large images.")
            return read_image(path)
        except LvitError as exc:
            problem = (getattr(exc, "problem", None) or str(exc)).replace(str(path), name)
            raise LvitError(problem if problem.startswith(name) else f"{name}: {problem}") from None
        finally:
            if path.name.startswith("upload-") and path.parent == self.work_dir:
                path.unlink(missing_ok=True)

    def _prune(self, max_age_s: float = 3600.0) -> None:
        """Remove mask files older than ``max_age_s`` (the page has handed them to Gradio long since)."""
        import shutil
        import time

        now = time.time()
        for folder in self.work_dir.glob("*"):
            try:
                if folder.is_dir() and now - folder.stat().st_mtime > max_age_s:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                pass

    def write_report(self, path: str | Path | None) -> tuple[str, str]:
        """(report, message) from the report writer hook (None: not available)."""
        if self.report_writer is None:
            return "", "No report writer for this model (lvit train-reporter): type the report."
        try:
            return self.report_writer(self.read_upload(path)), "Report written from the image: check it before use."
        except LvitError as exc:
            return "", str(exc)

    def segment(self, path: str | Path | None, report: str | None, threshold: float | None = None) -> Result:
        """``threshold``: None = the model's own (chosen by lvit calibrate; else 0.5)."""
        try:
            return self._segment(path, report, threshold)
        except LvitError as exc:
            return Result(message=str(exc))
        except Exception as exc:  # noqa: BLE001 - the page's boundary: a sentence, never a traceback
            return Result(message=f"Could not segment this image ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]}).")

    def _segment(self, path, report, threshold: float | None) -> Result:
        from ..core.io import save_png
        from ..core.overlays import mask_png
        from ..evaluate.explanation import heatmap_overlay, mask_overlay
        from ..evaluate.gradcam import explain_image

        threshold = self.segmenter.threshold if threshold is None else threshold
        if not 0.0 < float(threshold) < 1.0:
            raise LvitError("The threshold must lie between 0 and 1.")
        image = self.read_upload(path)
        text = " ".join(str(report or "").split())
        from ..inference.segmenter import MIXED_REPORTS

        notes = []
        mixed = None  # [H, W]: the mask averaged over the written reports (the model's own report writer)
        if self.reads_text and not text and not self.segmenter.has_no_report_path:
            if self.segmenter.report_writer_folder() is not None:  # as lvit predict without --text does
                (mixed,), (text,) = self.segmenter.predict_written([image])
                notes.append(f'No report: the report writer wrote "{text}" from the image; the mask averages the '
                             f"model's answers with the writer's {MIXED_REPORTS} most likely reports (Grad-CAM: "
                             "with the one shown). A true report usually gives a better mask.")
            elif self.report_writer is None:
                raise LvitError("This model reads the report: type the image's report first.")
            else:
                text = " ".join(str(self.report_writer(image)).split())
                notes.append(f'No report: the report writer wrote "{text}" from the image and the model read it; '
                             "a true report usually gives a better mask.")
        elif self.reads_text and not text:
            notes.append("No report: the mask comes from the model's no-report path (learned with report dropout); "
                         "a report, where there is one, usually gives a better mask.")
        elif self.reads_text:
            check = self.segmenter.checker.check(text)
            if check.truncated:
                notes.append(f"The report is long: the model reads its first {check.kept} of {check.tokens} "
                             "tokens (word pieces).")
            if check.unfamiliar:
                notes.append("The report is far from the training reports (few or none of its words were seen in "
                             "training): do not trust the mask.")
        elif text:
            notes.append(f"{self.title} does not read reports: the report was ignored.")
        (expl,) = explain_image(self.segmenter.model, image, [text], self.segmenter.encode_text, [self.layer])
        prob = expl.probability if mixed is None else mixed
        mask = prob >= float(threshold)
        stem = Path(str(path)).stem[:40] or "image"
        self._prune()
        mask_file = self.work_dir / uuid.uuid4().hex / f"{stem}_mask.png"
        save_png(mask_file, mask_png(mask))
        h, w = mask.shape
        message = (f"{w} x {h} image: {int(mask.sum()):,} pixels ({100 * mask.mean():.2f} %) above probability "
                   f"{float(threshold):g}; Grad-CAM of layer {self.layer}.")
        return Result(message=message, overlay=mask_overlay(image, mask), probability=_colour_map(prob),
                      gradcam=heatmap_overlay(image, expl.cams[self.layer]), mask_file=str(mask_file), notes=notes)


def _header_pixels(path: Path) -> int | None:
    """Width x height from the file header only (no decoding), or None when the header cannot tell."""
    import warnings

    from ..data.readers import suffix_of

    suffix = suffix_of(path)
    try:
        if suffix in (".dcm", ".dicom"):
            import pydicom

            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
            return int(ds.Rows) * int(ds.Columns)
        if suffix in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
            from PIL import Image

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    return int(im.size[0]) * int(im.size[1])
    except Exception:  # noqa: BLE001 - an unreadable header: read_image names the problem
        return None
    return None


def _colour_map(prob: np.ndarray) -> np.ndarray:
    """A probability map in [0, 1] -> HxWx3 uint8 (viridis: dark = 0, yellow = 1)."""
    from matplotlib import colormaps

    return (colormaps["viridis"](np.clip(prob, 0, 1))[..., :3] * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# The page


def import_gradio():
    """Gradio, or a one-line ConfigError saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gradio
    except ImportError:
        raise ConfigError(f"lvit app needs Gradio, an optional dependency: {APP_EXTRA}") from None
    return gradio


def build_app(segmenter: Page):
    """The Gradio Blocks page around ``segmenter`` (a :class:`Page`; queued: one image at a time)."""
    gr = import_gradio()

    reads_text = segmenter.reads_text
    # delete_cache: Gradio's copies of uploads and results older than an hour go, checked every 30 minutes.
    with gr.Blocks(title=f"lvit: {segmenter.title}", analytics_enabled=False, delete_cache=(1800, 3600)) as page:
        gr.Markdown(f"## lvit: try {segmenter.title} ({segmenter.source.name})\n"
                    "Research use only: **not for diagnosis**. Upload a chest X-ray"
                    + (", type its report" if reads_text else "") + " and press *Segment*.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Chest X-ray (PNG, JPEG or DICOM)", type="filepath", elem_id="upload")
                # REPORT BOX. Writing the report from the image: the REPORT WRITER HOOK above (Page's
                # report_writer); the button below then fills this box. Hidden while there is none.
                label = ("Report (optional: the model also answers without one)"
                         if segmenter.segmenter.has_no_report_path else "Report") if reads_text \
                    else "Report (this model does not read it)"
                report = gr.Textbox(label=label,
                                    lines=3, elem_id="report", interactive=reads_text,
                                    placeholder=("e.g. Bilateral pulmonary infection, two infected areas, upper left "
                                                 "lung and lower right lung." if reads_text else ""))
                write = gr.Button("Write the report from the image", visible=segmenter.report_writer is not None
                                  and reads_text, elem_id="write-report")
                own = segmenter.segmenter.threshold_record is not None
                threshold = gr.Slider(0.05, 0.95, value=segmenter.segmenter.threshold, step=0.05,
                                      label="Probability threshold" + (" (the model's own: chosen on validation "
                                                                       "images)" if own else ""))
                run = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column(scale=2):
                status = gr.Markdown("Waiting for an image.", elem_id="status")
                with gr.Row():
                    shown = dict(format="png", interactive=False, height=IMAGE_HEIGHT,
                                 buttons=["download", "fullscreen"], elem_classes=["lvit-view"])
                    overlay = gr.Image(label="Mask over the image", elem_id="overlay", **shown)
                    probability = gr.Image(label="Probability map", elem_id="probability", **shown)
                    gradcam = gr.Image(label=f"Grad-CAM ({segmenter.layer})", elem_id="gradcam", **shown)
                mask_file = gr.File(label="Mask (PNG, 0/255, the image's size)", interactive=False,
                                    elem_id="mask-file")

        def on_segment(path, text, level):
            result = segmenter.segment(path, text, level)
            lines = [("" if result.ok else "**Could not segment:** ") + result.message, *result.notes]
            return ("\n\n".join(lines), result.overlay, result.probability, result.gradcam, result.mask_file)

        def on_write(path):
            text, message = segmenter.write_report(path)
            return text, message

        run.click(on_segment, [upload, report, threshold], [status, overlay, probability, gradcam, mask_file])
        write.click(on_write, [upload], [report, status])
    page.queue(default_concurrency_limit=1, max_size=32)
    return page


def launch(source, port: int | None = None, host: str = "127.0.0.1", device: str = "cpu",
           layer: str | None = None, block: bool = True, report_writer: ReportWriter | None = None):
    """Load the model (``source``: a :class:`lvit.inference.Segmenter` or what one is built from), build the page and
    serve it; returns the Gradio page (``block=False``: serving in a thread)."""
    gr = import_gradio()
    segmenter = Page(source, device=device, layer=layer, report_writer=report_writer)
    page = build_app(segmenter)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts
    try:
        page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=False, quiet=True,
                    max_file_size=f"{MAX_UPLOAD_MB * 4}mb", ssr_mode=False, mcp_server=False, theme=theme,
                    footer_links=[], css=PAGE_CSS)
    except OSError as exc:  # a port in use, an address not of this machine
        raise ConfigError(f"cannot serve on {host}:{port or 'first free port from 7860'}: "
                          f"{' '.join(str(exc).split())[:200]}") from None
    return page


__all__ = ["MAX_PIXELS", "MAX_UPLOAD_MB", "Page", "ReportWriter", "Result", "build_app", "import_gradio", "launch"]
