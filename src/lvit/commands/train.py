"""``lvit train``: train LViT, LViT-T or U-Net from a preset into a run folder (or resume one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_override_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``train`` and ``demo``: shortcuts for the common ``--set`` overrides."""
    p.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs")
    p.add_argument("--batch-size", type=int, default=None, help="data.batch_size")
    p.add_argument("--lr", type=float, default=None, help="optim.lr")
    p.add_argument("--precision", default=None,
                   help="trainer.precision: 32-true | bf16-mixed (CPU or GPU) | 16-mixed (GPU)")
    p.add_argument("--accelerator", default=None, help="trainer.accelerator: auto | cpu | gpu")
    p.add_argument("--devices", default=None, help="devices per node (DDP when > 1), or 'auto'")
    p.add_argument("--num-nodes", type=int, default=None, help="trainer.num_nodes (multi-node DDP)")
    p.add_argument("--strategy", default=None, help="trainer.strategy (default: ddp when several devices)")
    p.add_argument("--seed", type=int, default=None, help="trainer.seed")
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (DataLoader processes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set optim.grad_clip=1.0 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def collect_overrides(args: argparse.Namespace) -> list[str]:
    pairs = [
        ("trainer.max_epochs", args.epochs), ("data.batch_size", args.batch_size), ("optim.lr", args.lr),
        ("trainer.precision", args.precision), ("trainer.accelerator", args.accelerator),
        ("trainer.devices", args.devices), ("trainer.num_nodes", args.num_nodes),
        ("trainer.strategy", args.strategy), ("trainer.seed", args.seed), ("data.num_workers", args.workers),
    ]
    out = [f"{key}={value}" for key, value in pairs if value is not None]
    if getattr(args, "model", None):
        out.append(f"model_name={args.model}")
    if args.no_progress:
        out.append("trainer.progress=false")
    return out + list(args.overrides)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model into a run folder (checkpoints, metrics.csv, TensorBoard)",
        description="Train LViT (or LViT-T / U-Net) on a dataset in the LViT layout. Writes RUN_DIR/config.yaml, "
                    "metrics.csv, tensorboard/, checkpoints/{best,last}.safetensors and last.ckpt (for --resume).",
    )
    p.add_argument("--config", default=None,
                   help="YAML config or preset name (qata, qata-cpu, qata-gpu, mosmed, monuseg, synth); "
                        "default: built-in defaults")
    p.add_argument("--data", default=None,
                   help="dataset root (Train_Folder/Val_Folder/..., or images/ + prompts/annotation.json)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to create (or resume)")
    p.add_argument("--model", default=None, help="a registered network (lvit, lvit-t, unet; default: the config's)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN_DIR from checkpoints/last.ckpt with its saved config (plus overrides)")
    p.add_argument("--force", action="store_true", help="train into a non-empty RUN_DIR")
    p.add_argument("--init-from", default=None, metavar="RUN_OR_WEIGHTS",
                   help="start from another run's weights: every tensor whose name and shape match is loaded (a U-Net "
                        "run into LViT's CNN branch, as the official LViT_pretrain); RUN_DIR/init_from.json lists "
                        "what was and was not loaded (trainer.init_from)")
    add_override_arguments(p)
    from ..train.semi_flags import add_semi_arguments  # semi-supervised flags (lvit.train.semi)

    add_semi_arguments(p)
    p.set_defaults(func=run)


def _remove_failed_run(out: Path) -> None:
    """After a failure before the first checkpoint, remove the run folder this call created (config.yaml,
    tensorboard/ ...): no stub is left behind, and the retry needs no --force."""
    import shutil

    from ..artifacts.runs import CKPT_DIR

    saved = [p for p in (out / CKPT_DIR).glob("*") if not p.name.endswith(".tmp")]  # weights or checkpoints
    if out.is_dir() and not saved:
        shutil.rmtree(out, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError, DataError
    from ..presets import resolve_config
    from ..train.config import load_config
    from ..train.runner import resume_config, train
    from ..train.semi_flags import semi_overrides

    overrides = collect_overrides(args) + semi_overrides(args, resume=args.resume)
    if args.init_from is not None:
        if args.resume:
            raise ConfigError("--init-from starts a new run; a resumed run continues from its own checkpoint")
        overrides.append(f"trainer.init_from={json.dumps(args.init_from)}")  # quoted: YAML keeps the path as written
    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the config saved in RUN_DIR; change values with --set instead of --config")
        config, saved_root = resume_config(args.out, overrides)
        root = args.data or saved_root
    else:
        config = load_config(resolve_config(args.config), overrides)
        root = args.data or config.data.root
    if not root:
        raise ConfigError("no dataset: pass --data ROOT (or set data.root in the config)")
    if not Path(root).is_dir():
        raise DataError(root, "dataset folder not found" if not Path(root).exists() else "not a folder (--data)")
    out = Path(args.out)
    fresh = not args.resume and (not out.exists() or (out.is_dir() and not any(out.iterdir())))
    try:
        result = train(config, root, args.out, resume=args.resume, force=args.force)
    except BaseException:
        if fresh:
            _remove_failed_run(out)
        raise
    print(f"trained {config.model_name}: {result.epochs} epoch(s), best val Dice {result.best_dice:.4f} "
          f"at epoch {result.best_epoch}{' (early stop)' if result.stopped_early else ''}, {result.seconds:.0f} s")
    print(f"run folder: {result.run_dir} (checkpoints/best.safetensors, metrics.csv, tensorboard/)")
    return 0
