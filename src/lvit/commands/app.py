"""``lvit app``: a web page to try a model (Gradio, optional: ``pip install -e ".[app]"``)."""

from __future__ import annotations

import argparse

from .common import add_device_argument, add_model_argument, add_reporter_argument, default_model


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "app",
        help="a web page to try a model: upload an X-ray, type the report, see mask, probabilities, Grad-CAM",
        description="Serve a Gradio page for a run or model folder: upload a chest X-ray (PNG, JPEG or DICOM), type "
                    "its report, and see the predicted mask over the image, the probability map and Grad-CAM; "
                    "download the mask. One image at a time (others queue). Needs the optional extra: "
                    'pip install -e ".[app]". Serves on 127.0.0.1 unless --host is given.',
    )
    add_model_argument(p)
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    add_device_argument(p)
    p.add_argument("--layer", default=None, help="Grad-CAM layer (default up.0; see lvit explain RUN --list-layers)")
    add_reporter_argument(p, "for the page's 'Write the report from the image' button")
    p.set_defaults(func=run)


def report_writer_for(segmenter):
    """``image -> report`` from the report writer of ``segmenter`` (the one named with --reporter, or the run's
    own); None when the model reads no reports or has no writer (the page then hides the button)."""
    from ..core.errors import ConfigError

    if not segmenter.uses_text:
        if segmenter.reporter is not None:
            raise ConfigError(f"--reporter: the model of {segmenter.source} does not read reports")
        return None
    if segmenter.report_writer_folder() is None:
        return None
    return segmenter.report_writer.report


def run(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError
    from ..inference import Segmenter, resolve_device
    from .webapp import import_gradio, launch

    if args.port is not None and not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {args.port}")
    import_gradio()  # the missing extra is one line, before the model loads
    resolve_device(args.device)
    args.checkpoint = default_model(args.checkpoint, "lvit app: model: the shipped {name} ({folder})")
    segmenter = Segmenter(args.checkpoint, device=args.device, reporter=args.reporter)  # a bad folder: one line
    writer = report_writer_for(segmenter)
    print(f"lvit app: loading {args.checkpoint} ... (Ctrl-C to stop)", flush=True)
    if writer is not None:
        print("lvit app: the page can write the report from the image (report writer found)", flush=True)
    page = launch(segmenter, port=args.port, host=args.host, device=args.device, layer=args.layer, block=False,
                  report_writer=writer)
    print(f"lvit app: serving {page.local_url}", flush=True)
    import time

    try:
        while True:  # Gradio serves in its own thread
            time.sleep(3600)
    except KeyboardInterrupt:
        page.close()
        print("lvit app: stopped")
    return 0
