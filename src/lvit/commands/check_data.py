"""``lvit check-data ROOT``: list every problem of a dataset; exit 1 if there is any."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check-data",
        help="validate a dataset and list all problems",
        description="Read every image, mask and report table of a dataset in the LViT layout once and print a "
        "table of ALL problems (file, problem). Exit status 1 if there is any problem, 0 otherwise.",
    )
    p.add_argument("root", help="dataset folder (with Train_Folder / Val_Folder / Test_Folder)")
    p.add_argument("--image-column", default="Image", help="table column with the mask/image file name (default Image)")
    p.add_argument("--text-column", default="Description", help="table column with the report (default Description)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.layout import SPLITS, index_folder, split_folder
    from ..data.validate import check_data, format_problems

    problems = check_data(args.root, args.image_column, args.text_column, progress=True)
    if problems:
        print(format_problems(problems))
        print(f"\n{len(problems)} problem(s) found in {args.root}")
        return 1
    root = Path(args.root)
    counts = []
    for split in SPLITS:
        folder = split_folder(root, split)
        if folder.is_dir():
            counts.append(f"{split} {len(index_folder(folder / 'img'))}")
    print(f"{args.root}: OK ({', '.join(counts)} images; every image has a mask and a report)")
    return 0
