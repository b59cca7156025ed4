"""``lvit app``: a web page to try a model (Gradio, optional: ``pip install -e ".[app]"``)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "app",
        help="a web page to try a model: upload an X-ray, type the report, see mask, probabilities, Grad-CAM",
        description="Serve a Gradio page for a run or model folder: upload a chest X-ray (PNG, JPEG or DICOM), type "
                    "its report, and see the predicted mask over the image, the probability map and Grad-CAM; "
                    "download the mask. One image at a time (others queue). Needs the optional extra: "
                    'pip install -e ".[app]". Serves on 127.0.0.1 unless --host is given.',
    )
    p.add_argument("checkpoint", metavar="MODEL", nargs="?", default=None,
                   help="a run folder, its .safetensors weights, a model folder (lvit export --hf) or a shipped "
                        "model's name (default: the shipped QaTa-COV19 chest X-ray model, qata-lvit)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--layer", default=None, help="Grad-CAM layer (default up.0; see lvit explain RUN --list-layers)")
    p.add_argument("--reporter", metavar="DIR", default=None,
                   help="report writer folder (lvit train-reporter) for the page's 'Write the report from the image' "
                        "button; default: the run's own RUN/reporter/ when it has one")
    p.set_defaults(func=run)


def report_writer_for(source: str, reporter: str | None, device: str):
    """``image -> report`` from the writer ``--reporter`` names, or the run's own one; None when the model reads
    no reports or no writer is there (the page then hides the button)."""
    from ..artifacts.reporter_folder import find_reporter
    from ..core.errors import ConfigError
    from ..evaluate.predict import read_run
    from ..models import reads_text

    run_dir, _, run_config = read_run(source)
    if not reads_text(run_config.get("model_name", "lvit"), run_config.get("model")):
        if reporter is not None:
            raise ConfigError(f"--reporter: the model of {source} does not read reports")
        return None
    folder = find_reporter(reporter if reporter is not None else run_dir)
    if folder is None:
        if reporter is not None:
            raise ConfigError(f"--reporter {reporter}: no report writer there (reporter.json); train one with "
                              "lvit train-reporter")
        return None
    from ..evaluate.reporter import ReportWriter

    return ReportWriter(folder, device=device).report


def run(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError
    from ..evaluate.predict import read_run, resolve_device
    from .webapp import import_gradio, launch

    if args.port is not None and not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {args.port}")
    import_gradio()  # the missing extra is one line, before the model loads
    resolve_device(args.device)
    if args.checkpoint is None:
        from ..artifacts.runs import DEFAULT_MODEL, shipped_model

        if shipped_model(DEFAULT_MODEL) is None:
            raise ConfigError(f"no model given and this lvit ships no {DEFAULT_MODEL}: pass a run or model folder")
        args.checkpoint = DEFAULT_MODEL
        print(f"lvit app: model: the shipped {DEFAULT_MODEL} ({shipped_model(DEFAULT_MODEL)})", flush=True)
    read_run(args.checkpoint)  # a bad folder is one line too
    writer = report_writer_for(args.checkpoint, args.reporter, args.device)
    print(f"lvit app: loading {args.checkpoint} ... (Ctrl-C to stop)", flush=True)
    if writer is not None:
        print("lvit app: the page can write the report from the image (report writer found)", flush=True)
    page = launch(args.checkpoint, port=args.port, host=args.host, device=args.device, layer=args.layer, block=False,
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
