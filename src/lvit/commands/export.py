"""``lvit export``: a trained run (or checkpoint) to an ONNX file with a dynamic batch axis."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a trained run to ONNX (dynamic batch), checked against PyTorch",
        description="Export the model of a run folder or checkpoint to ONNX. The file is written atomically, "
        "checked with onnx.checker, and ONNX Runtime's logits are compared with PyTorch's (max abs diff "
        "<= --atol) before it replaces anything. Spatial size is fixed to the model's image_size.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN", help="a run folder, or its .safetensors/.ckpt file")
    p.add_argument("--onnx", required=True, type=Path, metavar="FILE", help="ONNX file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; the dynamo exporter needs >= 18)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch.onnx exporter (default torchscript: fast and opset-17 capable; see lvit.export)")
    p.add_argument("--atol", type=float, default=1e-3, help="max |logit| difference ORT vs PyTorch (default 1e-3)")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..export import export_onnx
    from ..io import refuse_clobber
    from ..train.checkpoint import load_run

    if args.opset < 13:
        raise ConfigError(f"--opset must be >= 13 (scaled dot-product attention needs it), got {args.opset}")
    refuse_clobber(args.onnx, args.force)  # before the (slower) model load
    model, run_config = load_run(args.checkpoint, map_location="cpu")
    weights = getattr(model, "lvit_weights", args.checkpoint)
    summary = export_onnx(model, args.onnx, opset=args.opset, force=args.force, exporter=args.exporter,
                          atol=args.atol, metadata={"lvit.model_name": run_config.get("model_name", ""),
                                                    "lvit.weights": str(weights)})
    print(f"wrote {summary['path']} (opset {summary['opset']}, {summary['exporter']} exporter, inputs "
          f"{', '.join(summary['inputs'])}, dynamic batch; ONNX Runtime vs PyTorch max |dlogit| "
          f"{summary['max_abs_diff']:.2e})")
    return 0
