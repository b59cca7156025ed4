"""``lvit predict``: segment one image (or a folder with a report table) with a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="segment an image (or a folder of images with a report table) with a trained run",
        description="Predict a mask at the input's original size. One image: --image X.png --text '...' --out "
                    "mask.png [--prob prob.png] [--overlay ov.png]. A folder: --images DIR --reports table.xlsx|csv "
                    "--out OUT_DIR [--prob] [--overlay] (writes OUT_DIR/masks/, probs/, overlays/).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN", help="a run folder or its .safetensors weights")
    p.add_argument("--image", help="one image file (PNG, JPEG, TIFF, DICOM, NIfTI)")
    p.add_argument("--text", help="the image's report (needed by text-guided models)")
    p.add_argument("--images", help="folder of images (batch form)")
    p.add_argument("--reports", help="report table (.xlsx/.csv) for --images")
    p.add_argument("--image-column", default="Image", help="table column naming the image (or its mask)")
    p.add_argument("--text-column", default="Description", help="table column holding the report")
    p.add_argument("--out", required=True, help="mask PNG (one image) or output folder (--images)")
    p.add_argument("--prob", nargs="?", const=True, default=None,
                   help="also save the probability map (one image: its PNG path; --images: a flag)")
    p.add_argument("--overlay", nargs="?", const=True, default=None,
                   help="also save an overlay of the predicted contour (one image: PNG path; --images: a flag)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", default="torch", choices=("torch", "onnx"),
                   help="inference backend: torch (default) or onnx (ONNX Runtime on CPU; uses RUN/model.onnx "
                        "from `lvit export` when present, else exports on the fly)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if bool(args.image) == bool(args.images):
        raise ConfigError("give either --image FILE (with --text) or --images DIR (with --reports)")
    if not 0.0 < args.threshold < 1.0:
        raise ConfigError(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.image:
        for flag, value in (("--prob", args.prob), ("--overlay", args.overlay)):
            if value is True:
                raise ConfigError(f"{flag} needs a PNG path when predicting one image")
        return _predict_one(args)
    return _predict_folder(args)


def _predictor(args):
    from ..evaluate.predict import Predictor

    return Predictor(args.checkpoint, device=args.device, backend=args.backend)


def _predict_one(args) -> int:
    from ..data import read_image
    from ..errors import ConfigError
    from ..evaluate.overlays import mask_png, overlay, probability_png
    from ..io import refuse_clobber, save_png

    outputs = [Path(p) for p in (args.out, args.prob, args.overlay) if p]
    for path in outputs:
        refuse_clobber(path, args.force)
    predictor = _predictor(args)
    if predictor.uses_text and not (args.text and args.text.strip()):
        raise ConfigError(f"{args.checkpoint}: this model reads the report: pass --text \"...\"")
    image = read_image(args.image)
    prob = predictor.predict(image, args.text if predictor.uses_text else None)  # [H, W] original size
    mask = prob >= args.threshold
    save_png(args.out, mask_png(mask))
    if args.prob:
        save_png(args.prob, probability_png(prob))
    if args.overlay:
        save_png(args.overlay, overlay(image, mask))
    h, w = mask.shape
    print(f"{args.image}: {w}x{h}, {int(mask.sum())} foreground pixels ({100 * mask.mean():.2f}%) -> "
          + ", ".join(str(p) for p in outputs))
    return 0


def _pairs(args, uses_text: bool) -> list[tuple[Path, str | None]]:
    """(image path, report) of every image to predict in --images, matched through --reports."""
    from ..data.layout_official import match_row, read_table
    from ..data.records import index_folder
    from ..errors import ConfigError, DataError

    folder = Path(args.images)
    if not folder.is_dir():
        raise DataError(folder, "image folder not found")
    images = index_folder(folder)
    if not images:
        raise DataError(folder, "no image files in this folder")
    if not args.reports:
        if uses_text:
            raise ConfigError(f"{args.checkpoint}: this model reads reports: pass --reports table.xlsx|csv")
        return [(path, None) for path in images.values()]
    table = Path(args.reports)
    pairs = []
    for row in read_table(table, args.image_column, args.text_column):
        name, _ = match_row(row.key, images, {})
        if name is None:
            raise DataError(table, f"row {row.row}: no image in {folder} for {row.key!r}")
        if uses_text and not row.text:
            raise DataError(table, f"row {row.row}: empty report for {row.key!r}")
        pairs.append((images[name], row.text))
    return pairs


def _predict_folder(args) -> int:
    from tqdm import tqdm

    from ..data import read_image
    from ..evaluate.overlays import mask_png, overlay, probability_png
    from ..io import prepare_output_dir, save_png

    out = prepare_output_dir(args.out, args.force)
    predictor = _predictor(args)
    pairs = _pairs(args, predictor.uses_text)
    size = max(1, args.batch_size)
    with tqdm(total=len(pairs), desc="lvit predict", unit="img") as bar:
        for start in range(0, len(pairs), size):
            chunk = pairs[start:start + size]
            images = [read_image(path) for path, _ in chunk]
            texts = [text for _, text in chunk] if predictor.uses_text else None
            for (path, _), image, prob in zip(chunk, images, predictor.predict_many(images, texts)):
                mask = prob >= args.threshold
                save_png(out / "masks" / f"{path.stem}.png", mask_png(mask))
                if args.prob:
                    save_png(out / "probs" / f"{path.stem}.png", probability_png(prob))
                if args.overlay:
                    save_png(out / "overlays" / f"{path.stem}.png", overlay(image, mask))
                bar.update(1)
    print(f"predicted {len(pairs)} image(s) -> {out}/masks/" + (", probs/" if args.prob else "")
          + (", overlays/" if args.overlay else ""))
    return 0
