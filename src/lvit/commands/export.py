"""``lvit export``: a trained run (or checkpoint) to an ONNX file with a dynamic batch axis, or to a model folder
in the Hugging Face layout (config.json + model.safetensors + README.md model card)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a trained run to ONNX (dynamic batch, checked against PyTorch) or to a Hugging Face model folder",
        description="--onnx FILE: the model of a run folder or checkpoint as ONNX. The file is written atomically, "
        "checked with onnx.checker, and ONNX Runtime's logits are compared with PyTorch's (max abs diff "
        "<= --atol) before it replaces anything. Spatial size is fixed to the model's image_size. "
        "--hf DIR: a model folder (config.json, model.safetensors, README.md model card with the training data, "
        "its licence notes, the test metrics of RUN/test*/metrics.json, the text encoder and the preset) that "
        "lvit predict/explain/test/app take like a run folder.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN",
                   help="a run folder, its .safetensors/.ckpt file, or a model folder")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", type=Path, metavar="FILE", help="ONNX file to write")
    target.add_argument("--hf", type=Path, metavar="DIR", help="model folder to write (Hugging Face layout)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; the dynamo exporter needs >= 18)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch.onnx exporter (default torchscript: fast and "
                        "opset-17 capable; see lvit.artifacts.export)")
    p.add_argument("--atol", type=float, default=1e-3, help="max |logit| difference ORT vs PyTorch (default 1e-3)")
    p.add_argument("--metrics", nargs="+", default=None, metavar="FILE",
                   help="--hf: lvit test's metrics.json file(s) for the model card (default: RUN/test*/metrics.json)")
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help="--hf: the training data (qata, mosmed, monuseg, synthetic, or any name; default: guessed)")
    p.add_argument("--data-licence", default=None, metavar="TEXT",
                   help="--hf: licence notes of the training data for the model card")
    p.add_argument("--fp16", action="store_true",
                   help="--hf: store the weights as float16 (half the size; loaded back as float32; a tensor "
                        "holding a value beyond float16's range stays float32)")
    p.add_argument("--force", action="store_true", help="overwrite FILE / replace the model in DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.hf is not None:
        return _export_hf(args)
    from ..artifacts.export import export_onnx
    from ..artifacts.runs import load_run
    from ..core.errors import ConfigError
    from ..core.io import refuse_clobber

    if args.opset < 13:
        raise ConfigError(f"--opset must be >= 13 (scaled dot-product attention needs it), got {args.opset}")
    if args.metrics or args.dataset or args.data_licence or args.fp16:
        raise ConfigError("--metrics, --dataset, --data-licence and --fp16 go with --hf (the model folder)")
    refuse_clobber(args.onnx, args.force)  # before the (slower) model load
    loaded = load_run(args.checkpoint, map_location="cpu")
    summary = export_onnx(loaded.model, args.onnx, opset=args.opset, force=args.force, exporter=args.exporter,
                          atol=args.atol, metadata={"lvit.model_name": loaded.model_name,
                                                    "lvit.weights": str(loaded.weights)})
    print(f"wrote {summary['path']} (opset {summary['opset']}, {summary['exporter']} exporter, inputs "
          f"{', '.join(summary['inputs'])}, dynamic batch; ONNX Runtime vs PyTorch max |dlogit| "
          f"{summary['max_abs_diff']:.2e})")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from ..artifacts.model_folder import export_model_folder
    from ..artifacts.runs import load_run
    from ..core.errors import DataError, OutputExistsError

    if args.hf.exists() and not args.hf.is_dir():
        raise OutputExistsError(f"--hf {args.hf}: exists and is not a folder")
    if args.hf.is_dir() and any(args.hf.iterdir()) and not args.force:  # before the model load
        raise OutputExistsError(f"--hf {args.hf}: exists and is not empty (use --force to replace the model in it)")
    for path in args.metrics or []:
        if not Path(path).is_file():
            raise DataError(path, "metrics file not found (--metrics)")
    from ..train.config import closest_preset

    loaded = load_run(args.checkpoint, map_location="cpu")
    folder = export_model_folder(args.checkpoint, args.hf, metrics_files=args.metrics, dataset=args.dataset,
                                 data_licence=args.data_licence, force=args.force, run=loaded, half=args.fp16,
                                 preset=closest_preset(loaded.config))
    files = sorted(p.name for p in folder.iterdir())
    print(f"wrote {folder}/ ({', '.join(files)}): {loaded.model_name} from {loaded.weights}; load it with "
          f"`lvit predict {folder} ...` or lvit.artifacts.runs.load_run")
    return 0
