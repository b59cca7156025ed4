"""``lvit check-data ROOT``: list every problem of a dataset; exit 1 if there is any."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check-data",
        help="validate a dataset and list all problems",
        description="Read every image, mask and report of a dataset (official LViT layout or the annotation-file "
        "layout, detected from the folder) once and print a table of ALL problems (file, problem). Notes (such as "
        "images no entry mentions) are listed but are not problems. Exit status 1 if there is any problem.",
    )
    p.add_argument("root", help="dataset folder (Train_Folder/Val_Folder/Test_Folder, or images/ + prompts/)")
    p.add_argument("--image-column", default="Image", help="table column with the mask/image file name (default Image)")
    p.add_argument("--text-column", default="Description", help="table column with the report (default Description)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from ..core.errors import DataError
    from ..data.layout import SPLIT_NAMES, detect_layout, load_split
    from ..data.validate import check_data, faults, format_problems

    problems = check_data(args.root, args.image_column, args.text_column, progress=True)
    if problems:
        print(format_problems(problems))
    bad = faults(problems)
    if bad:
        print(f"\n{len(bad)} problem(s) found in {args.root}")
        return 1
    counts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes above already list unused images
        for split in SPLIT_NAMES:
            try:
                counts.append(f"{split} {len(load_split(args.root, split))}")
            except DataError:  # a split this dataset does not have
                continue
    print(f"{args.root}: OK ({detect_layout(args.root)} layout; {', '.join(counts)} samples; every sample has "
          "an image, a mask and a report)")
    return 0
