"""``lvit bench``: speed of LViT variants (eager, channels_last, bf16, torch.compile, ONNX Runtime) in one run."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..core.errors import ConfigError


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure images/s, peak memory and MFU of the model and its speed-up variants",
        description="Benchmark inference and training steps of LViT: eager fp32 against channels_last, bf16 "
        "autocast, torch.compile and ONNX Runtime, each checked against fp32 outputs. Writes markdown "
        "(and a .json beside it).",
    )
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats: finishes in about a minute")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, default=None, help="batch size (default 2 on CPU, 24 on CUDA; quick: 2)")
    p.add_argument("--sizes", type=_int_list, default=(224, 320, 448), help="image sizes of the scaling study")
    p.add_argument("--batches", type=_int_list, default=(1, 2, 4), help="batch sizes of the scaling study")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 5; quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of variants; 'training:compile' names one mode's variant")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a variant's worker is stopped")
    p.add_argument("--cases", default=None,
                   help="comma-separated subset of the full run's cases: default, paper-text, synth (default: all)")
    p.add_argument("--no-dataloader", action="store_true", help="skip the data-loading measurement")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile variants (aot_eager/eager: check the wiring on a CPU)")
    p.add_argument("--no-scaling", action="store_true", help="skip the image-size / batch-size study")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file to write (default: print only); a .json with the raw numbers goes beside it")
    p.add_argument("--results", type=Path, default=None,
                   help="also replace the Speed section of this RESULTS.md (between the speed markers)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..benchmark import Options, render_markdown, run_benchmark, write_speed_section
    from ..core.io import atomic_write_json, atomic_write_text, refuse_clobber

    if args.batch is not None and args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available to this torch build")
    if args.cases:
        from ..benchmark.harness import CASE_KEYS

        unknown = sorted({c.strip() for c in args.cases.split(",") if c.strip()} - set(CASE_KEYS))
        if unknown:
            raise ConfigError(f"--cases: unknown case(s) {', '.join(unknown)} (known: {', '.join(CASE_KEYS)})")
    if args.out is not None:
        refuse_clobber(args.out, args.force)
    opts = Options(
        quick=args.quick,
        device=args.device,
        batch=args.batch,
        sizes=args.sizes,
        batches=args.batches,
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        variants=tuple(v.strip() for v in args.variants.split(",")) if args.variants else None,
        scaling=not args.no_scaling,
        timeout_s=args.timeout,
        repo_root=Path.cwd(),
        compile_backend=args.compile_backend,
        cases=tuple(c.strip() for c in args.cases.split(",") if c.strip()) if args.cases else None,
        dataloader=not args.no_dataloader,
    )
    command = "lvit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "lvit bench"
    report = run_benchmark(opts, command=command)
    text = render_markdown(report)
    if args.out is not None:
        atomic_write_text(args.out, text + "\n")
        atomic_write_json(args.out.with_suffix(".json"), report)
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    if args.results is not None:
        write_speed_section(args.results, text, gpu=args.device == "cuda")
        print(f"updated the Speed section of {args.results}")
    if args.out is None and args.results is None:
        print(text)
    failed = [f"{label}/{mode}/{variant}" for label, entry in report["cases"].items()
              for mode in ("inference", "training") for variant, res in entry[mode].items() if "error" in res]
    if failed:
        print("warning: failed variants: " + ", ".join(failed), file=sys.stderr)
    # Eager must work; other variants may legitimately fail on some machines (reported in the table).
    eager_failed = any(f.endswith("/eager") for f in failed)
    return 1 if eager_failed else 0
