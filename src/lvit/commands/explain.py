"""``lvit explain``: Grad-CAM heat maps of chosen layers, and what the report changes in the prediction."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain",
        help="Grad-CAM of a model's layers on one image, with the real and a changed report side by side",
        description="Grad-CAM (MONAI) of the CNN decoder levels and PLAM gates (default, as the paper) or any "
                    "layers you name, saved as heat-map overlays at the image's size; plus "
                    "text_attribution.png: the same image predicted and explained with the report and with a "
                    "changed report (--alt-text, or left/right swapped, else upper/lower zones swapped).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN",
                   help="a run folder, its .safetensors weights, or a model folder (lvit export --hf)")
    p.add_argument("--image", help="image file to explain (PNG, JPEG, TIFF, DICOM, NIfTI)")
    p.add_argument("--text", help="the image's report (needed by text-guided models)")
    p.add_argument("--alt-text", default=None,
                   help="the changed report to compare with (default: sides swapped, else zones swapped)")
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="module names as in model.named_modules() (see --list-layers); "
                        "default: decoder levels and PLAM outputs")
    p.add_argument("--list-layers", action="store_true", help="print the layers Grad-CAM can explain and exit")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability threshold of the prediction (default: the model's own, else 0.5)")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..artifacts.threshold import describe_threshold
    from ..core.errors import ConfigError, DataError, warn
    from ..inference import Segmenter

    if args.list_layers:
        model = Segmenter(args.checkpoint).model
        from ..evaluate.gradcam import list_layers

        print(f"{'layer':<32} {'branch':<6} {'class':<22} output shape (default: *)")
        for info in list_layers(model):
            star = " *" if info.default else ""
            print(f"{info.name:<32} {info.kind:<6} {info.module_class:<22} {list(info.output_shape)}{star}")
        return 0
    missing = [flag for flag, value in (("--image", args.image), ("--out", args.out)) if not value]
    if missing:
        raise ConfigError(f"lvit explain needs {' and '.join(missing)} (or --list-layers)")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise ConfigError(f"--threshold must be in (0, 1), got {args.threshold}")

    from ..core.io import output_dir
    from ..data.readers import read_image

    # Inputs and the output folder first; the model (the slow part) last.
    if Path(args.image).is_dir():
        raise DataError(args.image, "is a folder; lvit explain takes one image file")
    image = read_image(args.image)  # HxWxC uint8; DataError names the file if unreadable
    segmenter = Segmenter(args.checkpoint)
    segmenter.warn_about_weights()
    reads_text = segmenter.uses_text
    threshold = args.threshold if args.threshold is not None else segmenter.threshold
    if reads_text and not args.text:
        raise ConfigError(f"{args.checkpoint}: this model reads the report: pass --text \"...\"")
    if not reads_text and (args.text or args.alt_text):
        warn(f"--text/--alt-text are ignored: the model of {args.checkpoint} ({segmenter.model_name}) does "
             "not read reports")
    with output_dir(args.out, args.force) as out:
        from ..evaluate.explanation import write_explanation
        from ..evaluate.gradcam import explain_image
        from ..text.reports import counterfactual_report

        model, encode = segmenter.model, segmenter.encode_text
        text = args.text or ""
        alt_text = args.alt_text if args.alt_text is not None else (counterfactual_report(text) if encode else "")
        explanations = explain_image(model, image, [text, alt_text], encode, args.layers)
        summary = write_explanation(out, image, (text, alt_text), tuple(explanations), threshold,
                                    extra={"checkpoint": str(Path(args.checkpoint)), "image": str(Path(args.image))})
    print(f"explained {len(summary['layers'])} layer(s) of {args.image}: {', '.join(summary['layers'])}; masks cut "
          "at " + (f"threshold {threshold:g} (--threshold)" if args.threshold is not None
                   else describe_threshold(segmenter.threshold_record)))
    print(f"report changed to: {alt_text!r}; mean |probability change| "
          f"{summary['mean_abs_probability_change']:.4f}")
    print(f"wrote {out}/ (cam_*.png, prediction.png, alt/, text_attribution.png, explain.json)")
    return 0
