"""``lvit describe``: LViT-style reports written from masks (one mask, or every mask of a dataset)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "describe",
        help="write LViT-style reports from lesion masks (one mask, or a whole dataset's report table)",
        description="Write the report LViT's template gives a lesion mask: 'bilateral pulmonary infection, two "
        "infected areas, upper left lung and lower right lung.' (sides, number of infected areas = zones named, "
        "upper/middle/lower zone per lung; 'left' = the image's left, as in LViT's reports; an empty mask is "
        "'no pulmonary infection.'). The rule and its agreement with QaTa-COV19's real reports: docs/DATA.md. "
        "With MASK files: print their reports. With --data ROOT: write a report for every mask of the dataset "
        "into its layout's table (official: each split's *_text.xlsx/.csv, a new <Split>_text.xlsx where there "
        "is none; annotation layout: prompts/annotation.json). Without --overwrite every existing report is "
        "kept and only masks without one get a report. An existing table is never changed without a backup: "
        "it is first copied to NAME.bak (NAME.bak1, ... when taken); nothing is written when nothing changes.",
    )
    p.add_argument("masks", nargs="*", metavar="MASK", help="mask file(s) (0/255 or 0/1 PNG, TIFF, ...)")
    p.add_argument("--data", metavar="ROOT", help="write the reports of every mask of this dataset")
    p.add_argument("--split", action="append", choices=["train", "val", "test"],
                   help="with --data: only this split (repeatable; default: every split the dataset has)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --data: replace existing reports too (the previous table is kept as NAME.bak)")
    p.add_argument("--dry-run", action="store_true", help="with --data: say what would change, write nothing")
    p.add_argument("--image-column", default="Image", help="official layout: mask file name column (default Image)")
    p.add_argument("--text-column", default="Description", help="official layout: report column (default Description)")
    p.add_argument("--capitalize", action="store_true",
                   help="with MASK: capitalise the first word (official spreadsheet style)")
    p.add_argument("--json", action="store_true", help="with MASK: print the structured findings as JSON lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..core.errors import ConfigError

    if bool(args.masks) == bool(args.data):
        raise ConfigError("give either MASK file(s) or --data ROOT (see lvit describe --help)")
    if args.masks:
        dataset_only = [f"--{n}" for n in ("split", "overwrite", "dry_run") if getattr(args, n)]
        if dataset_only:
            flags = ", ".join(d.replace("_", "-") for d in dataset_only)
            raise ConfigError(f"{flags}: only with --data ROOT")
        return _masks(args)
    return _dataset(args)


def _masks(args: argparse.Namespace) -> int:
    from ..data.describe import format_report, mask_findings
    from ..data.readers import read_mask

    for path in args.masks:
        findings = mask_findings(read_mask(path))
        report = format_report(findings, capitalize=args.capitalize)
        if args.json:
            print(json.dumps({"mask": path, "report": report, "sides": findings.sides, "count": findings.count,
                              "zones": [f"{lv} {side}" for lv, side in sorted(findings.zones)],
                              "pseudo_label": list(findings.flags)}))
        elif len(args.masks) == 1:
            print(report)
        else:
            print(f"{path}\t{report}")
    return 0


def _dataset(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.describe_dataset import describe_dataset

    reports = describe_dataset(args.data, args.split, overwrite=args.overwrite, dry_run=args.dry_run,
                               image_column=args.image_column, text_column=args.text_column)
    for report in reports:
        print(report.summary(Path(args.data)))
    return 0
