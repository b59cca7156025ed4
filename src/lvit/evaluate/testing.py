"""``lvit test``: score a trained run on a dataset split and write its evidence.

Outputs (folder ``OUT``, default ``RUN_DIR/test-<split>``):

* ``metrics.json``: Dice and IoU at the model's threshold (0.5 unless ``lvit calibrate`` chose one; recorded as
  ``threshold`` with ``threshold_source``: model, default or given), as the mean over images (what the paper
  reports) and pooled over the dataset, at the model's resolution (the official protocol: ground truth resized to
  ``image_size``) and at each image's original resolution (prediction resized back).
* ``per_image.csv``: name, Dice, IoU (both resolutions), ground-truth and predicted foreground pixels.
* ``masks/<image stem>.png``: predicted masks (0/255) at the original image size.
* ``overlays/best_*.png``, ``overlays/worst_*.png``: image + ground truth (green) + prediction (red)
  contours for the ``k`` best and worst images by Dice.
* with ``reports="generated"``: ``reports.csv`` (name, the dataset's report, the generated one, whether they
  say the same); the text-guided model then reads reports its report writer wrote from the images alone.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..core.io import atomic_write_json, atomic_write_text, save_png
from ..core.metrics import SegmentationScores
from ..core.overlays import mask_png, overlay

THRESHOLD = 0.5  # the official test code's; a model's own (lvit.artifacts.threshold) replaces it
EMPTY_CONVENTION = ("Dice = IoU = 1 when prediction and ground truth are both empty; 0 when only one is empty")


def default_out(run_dir: Path, split: str) -> Path:
    return run_dir / f"test-{split}"


def _eval_dataset(segmenter, records):
    """Records -> an un-augmented SegmentationDataset with the run's text (encoded once, cached)."""
    from ..data import SegmentationDataset

    size, channels = segmenter.image_size, segmenter.in_channels
    if not segmenter.uses_text:
        return SegmentationDataset(records, size, in_channels=channels)
    emb, mask = segmenter.text_for([r.text for r in records], len(records))
    if emb is None:  # no report for any image: the model's no-report path answers
        return SegmentationDataset(records, size, in_channels=channels)
    return SegmentationDataset(records, size, emb, mask, in_channels=channels)


def run_test(
    run_or_checkpoint: str | Path,
    data_root: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    *,
    force: bool = False,
    k: int = 4,
    batch_size: int = 8,
    device: str = "cpu",
    progress: bool = True,
    cache_dir: str | Path | None = None,
    reports: str = "true",
    reporter: str | Path | None = None,
    texts: list[str | None] | None = None,
    threshold: float | None = None,
) -> dict:
    """Evaluate a run (or a :class:`lvit.inference.Segmenter`) on ``split`` of ``data_root``; returns the metrics
    dict also written to metrics.json.

    ``cache_dir``: where encoded reports are cached (default: the dataset's own cache folder). ``reports``:
    "true" (the dataset's), "generated" (written from each image by the report writer ``reporter``, default
    the run's own ``RUN/reporter/``; text-guided models only) or "none" (no report: the model's no-report path,
    for a model trained with report dropout). ``texts``: the reports to read instead of the dataset's, one per
    image of the split in its order (None or blank: no report), e.g. a reworded or altered copy. ``threshold``:
    the probability the masks are cut at (default: the model's own, chosen by ``lvit calibrate``, else 0.5)."""
    from ..artifacts.runs import is_model_folder, shipped_model
    from ..core.errors import ConfigError, DataError
    from ..core.io import output_dir
    from ..data import load_split
    from ..inference import Segmenter
    from ..text import default_cache_dir

    # Everything cheap first (arguments, run folder, dataset, output folder), then the model.
    if k < 0:
        raise ConfigError(f"--k must be >= 0 (overlays of the k best and k worst images), got {k}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold must be in (0, 1), got {threshold}")
    data_root = Path(data_root)
    if isinstance(run_or_checkpoint, Segmenter):  # the caller's, already built (its config read once)
        segmenter, run_or_checkpoint = run_or_checkpoint, run_or_checkpoint.source
    else:
        segmenter = Segmenter(run_or_checkpoint, device=device, reporter=reporter,
                              cache_dir=cache_dir if cache_dir is not None else default_cache_dir(data_root))
    run_dir = segmenter.run_dir
    if out is None and is_model_folder(run_dir):
        if shipped_model(run_or_checkpoint) is None or Path(run_or_checkpoint).exists():
            raise ConfigError(f"{run_dir}: a model folder holds only the model (lvit does not write into it): pass "
                              "--out DIR for the test outputs")
        out = Path(f"{run_or_checkpoint}-test-{split}")  # a shipped model's name: beside the user, not in the package
    if not data_root.is_dir():
        raise DataError(data_root, "dataset folder not found" if not data_root.exists() else "not a folder (--data)")
    if reports not in REPORT_SOURCES:
        raise ConfigError(f"--reports must be one of {', '.join(REPORT_SOURCES)}, got {reports!r}")
    writer_folder = _writer_folder(segmenter) if reports == "generated" else None
    if reports == "none" and segmenter.uses_text and not segmenter.has_no_report_path:
        raise ConfigError(f"--reports none: the model of {run_or_checkpoint} reads the report and has no no-report "
                          "path (trained without model.report_dropout); score it with --reports generated instead")
    records = load_split(data_root, split)
    if texts is not None:
        if len(texts) != len(records):
            raise ConfigError(f"{len(texts)} reports given for the {len(records)} images of {split}")
        import dataclasses

        records = [dataclasses.replace(r, text=t) for r, t in zip(records, texts)]
    folder = Path(out) if out else default_out(run_dir, split)
    with output_dir(folder, force=force, what="test output folder") as folder:
        extra = {"reports": {"source": "true" if texts is None else "given"}}
        logits_of = None  # default: the model with each record's report
        if writer_folder is not None:
            records, extra, zone_probs = _generated_records(records, segmenter, folder, batch_size, progress)

            def logits_of(images: torch.Tensor, indices: list[int]) -> torch.Tensor:
                return segmenter.written_logits(images, zone_probs[indices])
        elif reports == "none":
            import dataclasses

            records = [dataclasses.replace(r, text=None) for r in records]
            extra = {"reports": {"source": "none"}}
        extra["reports"]["path"] = ("written" if writer_folder is not None
                                    else segmenter.report_path([r.text for r in records]))
        if threshold is None:
            threshold = segmenter.threshold
            extra["threshold_source"] = "model" if segmenter.threshold_record is not None else "default"
        else:
            extra["threshold_source"] = "given"
        return _score(segmenter, records, folder, data_root, split, k, batch_size, progress, extra, logits_of,
                      threshold)


REPORT_SOURCES = ("true", "generated", "none")


def _writer_folder(segmenter) -> Path:
    """The report writer of ``--reports generated`` (checked before anything slow)."""
    from ..core.errors import ConfigError

    if not segmenter.uses_text:
        raise ConfigError(f"--reports generated: the model of {segmenter.source} does not read reports")
    folder = segmenter.report_writer_folder()
    if folder is None:
        run_dir = segmenter.run_dir
        raise ConfigError(f"--reports generated: no report writer in {run_dir}/reporter (train one with lvit "
                          f"train-reporter {run_dir} --data ROOT, or pass --reporter DIR)")
    return folder


def _generated_records(records, segmenter, out: Path, batch_size: int, progress: bool):
    """The records with the writer's reports instead of the dataset's; writes ``out/reports.csv``.
    -> (records, metrics entry ``{"reports": {source, writer, agreement, mixed_reports}}``, zone scores [N, 6])"""
    import dataclasses

    from ..data.flags import report_agreement, same_findings
    from ..inference import write_reports
    from ..inference.segmenter import MIXED_REPORTS

    writer = segmenter.report_writer
    bar = tqdm(total=len(records), desc="report writer", unit="img", disable=not progress)

    def advance(done: int, total: int) -> None:
        bar.update(done - bar.n)

    generated, probs = write_reports(writer, records, batch_size=max(batch_size, 32), progress=advance)
    bar.close()
    buf = io.StringIO()
    table = csv.writer(buf, lineterminator="\n")
    table.writerow(["name", "true_report", "generated_report", "same_findings"])
    for r, g in zip(records, generated):
        table.writerow([r.name, r.text, g, int(same_findings(r.text, g))])
    atomic_write_text(out / "reports.csv", buf.getvalue())
    try:
        agreement = report_agreement(generated, [r.text for r in records])
    except ValueError:  # the dataset's reports are not in the template: nothing to compare with
        agreement = None
    info = {"source": "generated", "writer": str(writer.folder), "agreement_with_true_reports": agreement,
            "mixed_reports": MIXED_REPORTS}
    return [dataclasses.replace(r, text=g) for r, g in zip(records, generated)], {"reports": info}, probs


def _score(segmenter, records, out: Path, data_root: Path, split: str, k: int, batch_size: int,
           progress: bool, extra: dict | None = None, logits_of=None, threshold: float = THRESHOLD) -> dict:
    """Predict ``records``, write masks, per_image.csv, overlays and metrics.json into ``out``. ``logits_of(images
    [B, C, S, S], record indices) -> logits``: how to answer instead of the model with each record's report."""
    from ..data import load_pair
    from ..inference import to_original_size
    from ..inference.batch import BackgroundCalls

    run_dir = segmenter.run_dir
    dataset = _eval_dataset(segmenter, records)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                        collate_fn=lambda items: items)

    model_scores, orig_scores = SegmentationScores(), SegmentationScores()
    rows: list[dict] = []
    bar = tqdm(total=len(dataset), desc=f"lvit test ({split})", unit="img", disable=not progress)
    with BackgroundCalls() as saving:  # the masks are written while the next batch runs
        for items in loader:
            images = torch.stack([it["image"] for it in items])  # [B, C, S, S]
            text = torch.stack([it["text"] for it in items]) if "text" in items[0] else None
            text_mask = torch.stack([it["text_mask"] for it in items]) if "text_mask" in items[0] else None
            if logits_of is not None:
                logits = logits_of(images, [it["index"] for it in items]).cpu()  # [B, 1, S, S]
            else:
                logits = segmenter.logits(images, text, text_mask).cpu()
            for i, item in enumerate(items):
                record = records[item["index"]]
                _, mask_orig = load_pair(record, segmenter.in_channels)
                prob = to_original_size(logits[i:i + 1], item["orig_size"])[0, 0].numpy()  # [H, W]
                pred_orig = prob >= threshold
                stem = Path(record.name).stem
                saving.submit(save_png, out / "masks" / f"{stem}.png", mask_png(pred_orig))
                row = {"name": record.name, "mask_file": f"masks/{stem}.png", "pred_pixels": int(pred_orig.sum())}
                if item["has_mask"]:
                    pred_model = torch.sigmoid(logits[i, 0]).numpy() >= threshold
                    d, j = model_scores.add(record.name, pred_model, item["mask"][0].numpy() > 0.5)
                    do, jo = orig_scores.add(record.name, pred_orig, mask_orig.astype(bool))
                    row.update(dice=d, iou=j, dice_original=do, iou_original=jo, gt_pixels=int(mask_orig.sum()))
                rows.append(row)
                bar.update(1)
    bar.close()

    _write_per_image(out / "per_image.csv", rows)
    overlays = _write_overlays(out, records, rows, segmenter.in_channels, k)
    metrics = {
        "split": split,
        "data": str(data_root.resolve()),
        "run": str(run_dir),
        "weights": str(segmenter.weights),
        "weights_sha256": _sha256(segmenter.weights),
        "model_name": segmenter.run_config["model_name"],
        "threshold": threshold,
        "n_images": len(rows),
        "n_scored": model_scores.summary()["n_images"],
        "paper_metric": "mean_over_images (model resolution): mean of per-image Dice/IoU, as the official "
                        "test_model.py averages over the test images",
        "empty_convention": EMPTY_CONVENTION,
        "model_resolution": {"image_size": segmenter.image_size, **_figures(model_scores)},
        "original_resolution": _figures(orig_scores),
        "dice": _figures(model_scores).get("mean_over_images", {}).get("dice"),
        "iou": _figures(model_scores).get("mean_over_images", {}).get("iou"),
        "overlays": overlays,
        "masks": str(out / "masks"),
        **(extra or {}),
    }
    atomic_write_json(out / "metrics.json", metrics)
    metrics["out"] = str(out)
    return metrics


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _figures(scores: SegmentationScores) -> dict:
    if not scores.dice:
        return {}
    s = scores.summary()
    return {"mean_over_images": s["mean_over_images"], "dataset_level": s["dataset_level"]}


def _write_per_image(path: Path, rows: list[dict]) -> None:
    columns = ["name", "dice", "iou", "dice_original", "iou_original", "gt_pixels", "pred_pixels", "mask_file"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _write_overlays(out: Path, records, rows: list[dict], in_channels: int, k: int) -> list[str]:
    """Overlays of the k best and k worst scored images (by Dice at the original resolution)."""
    from ..data import load_pair, read_mask

    scored = [i for i, r in enumerate(rows) if "dice_original" in r]
    if not scored or k <= 0:
        return []
    order = sorted(scored, key=lambda i: (rows[i]["dice_original"], rows[i]["name"]))
    worst = order[:k]
    best = [i for i in reversed(order) if i not in worst][:k]
    by_name = {r.name: r for r in records}
    written = []
    for label, picks in (("best", best), ("worst", worst)):
        for rank, i in enumerate(picks, 1):
            row = rows[i]
            image, gt = load_pair(by_name[row["name"]], in_channels)
            pred = read_mask(out / row["mask_file"])
            stem = Path(row["name"]).stem
            path = out / "overlays" / f"{label}_{rank}_{stem}_dice{row['dice_original']:.3f}.png"
            save_png(path, overlay(image, pred, gt))
            written.append(str(path))
    return written


__all__ = ["EMPTY_CONVENTION", "THRESHOLD", "run_test"]
