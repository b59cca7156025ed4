"""``lvit report``: one self-contained HTML page of a run (curves, test metrics, cases, Grad-CAM, config)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a training run",
        description="One HTML file with every image inlined (opens offline, no server): training curves "
                    "from metrics.csv, the test metrics and the best/worst test cases with overlays and "
                    "Grad-CAM (from `lvit test RUN_DIR`'s output), and the run's config.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder made by lvit train")
    p.add_argument("--out", default=None, help="output HTML file (default RUN_DIR/report.html)")
    p.add_argument("--test-dir", default=None, help="output of lvit test (default RUN_DIR/test)")
    p.add_argument("--cases", type=int, default=3, help="how many best and how many worst cases to show")
    p.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="Grad-CAM layers of the cases (default: up.0 and vit_up.0, the finest CNN decoder "
                        "and ViT levels)")
    p.add_argument("--no-gradcam", action="store_true", help="skip Grad-CAM (no model run)")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError
    from ..evaluate.report import write_report

    if args.cases < 1:
        raise ConfigError(f"--cases must be >= 1, got {args.cases}")
    if args.layers and not args.no_gradcam:
        check_layers(args.run_dir, args.layers)
    path = write_report(args.run_dir, args.out, args.force, test_dir=args.test_dir, n_cases=args.cases,
                        layers=args.layers, gradcam=not args.no_gradcam)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def check_layers(run_dir: str, layers: list[str]) -> None:
    """Every --layers name must be a module of the run's model (checked on a weightless copy: no model load),
    so a typo is one error line, not a report whose Grad-CAM section holds the error."""
    import torch

    from ..core.errors import CheckpointError, ConfigError
    from ..inference import read_run
    from ..models import LViTConfig, build_model

    _, _, run_config = read_run(run_dir)
    try:
        with torch.device("meta"):
            model = build_model(run_config["model_name"], LViTConfig.from_dict(run_config["model"]))
    except (ConfigError, TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{run_dir}: invalid model config ({exc})") from None
    names = {name for name, _ in model.named_modules() if name}
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise ConfigError(f"--layers {' '.join(unknown)}: no such layer in the {run_config['model_name']} model of "
                          f"{run_dir}; list them with `lvit explain {run_dir} --list-layers`")
