"""What the lossy images of the packed QaTa-COV19 copy (bench/gpu/prepare.py --qata, WebP) do to Dice, on a CPU.

Two small LViTs at the paper's resolution (224 px; base width 8, batch 8, lr 1e-3, the qata preset otherwise) are
trained from the same seed on the first ``--train`` / ``--val`` records, one on the original PNGs and one on the
packed copy; each is tested on the whole test split (2,113 images) of both copies with ``lvit test``'s code.

* test-side effect: the same weights on original vs decoded test images (paired per image);
* train-side effect: the model trained on decoded images vs the one trained on originals, both on the original
  test images (this includes the run-to-run spread of two trainings that see different pixels).

    python bench/gpu/qata_lossy_effect.py --qata /path/to/QaTa --pack .devrun/qata --work /tmp/lossy

    python bench/gpu/qata_lossy_effect.py --qata /path/to/QaTa --pack .devrun/qata --work /tmp/lossy --run RUN

With ``--run``, only the test-side effect for an already trained run (e.g. the CPU table's LViT at 128 px): its
weights on the original vs the decoded test images, paired per image.

Prints a JSON summary and writes it to WORK/summary.json (with ``--run``: WORK/summary-run.json).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from lvit.data.layout_annotation import write_annotation

REPO = Path(__file__).resolve().parents[2]


def _prepare():
    spec = importlib.util.spec_from_file_location("bench_gpu_prepare", REPO / "bench" / "gpu" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pool workers unpickle its functions by module name
    spec.loader.exec_module(module)
    return module


def subset_of_originals(src: Path, dst: Path, limits: dict[str, int | None]) -> None:
    """The annotation-file layout with the first N records of each split, copied from ``src`` (lvit refuses
    symbolic links that leave the dataset folder)."""
    import shutil

    from lvit.data import load_split

    annotation = {}
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        records = load_split(src, split)[: limits[split]]
        for sub in ("images", "masks"):
            (dst / "images" / key / sub).mkdir(parents=True, exist_ok=True)
        annotation[key] = []
        for r in records:
            for path, sub in ((r.image_path, "images"), (r.mask_path, "masks")):
                link = dst / "images" / key / sub / path.name
                if not link.exists():
                    shutil.copy2(path, link)
            annotation[key].append({"image_path": r.mask_path.name, "caption": r.text})
    write_annotation(dst, annotation)


def per_image(metrics_dir: Path) -> dict[str, float]:
    with (metrics_dir / "per_image.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    key = next(k for k in rows[0] if k.startswith("dice"))
    name = next(k for k in rows[0] if k in ("name", "image"))
    return {r[name]: float(r[key]) for r in rows}


def paired(a: dict[str, float], b: dict[str, float]) -> dict:
    """Per-image differences b - a over the images both score: mean, its standard error, the largest, how many
    images changed at all."""
    import numpy as np

    names = sorted(a)
    d = np.array([b[n] - a[n] for n in names])
    return {"mean_diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))),
            "max_abs_diff": float(np.abs(d).max()), "images_changed": int((np.abs(d) > 1e-9).sum()), "n": len(d)}


def test_side_of_run(run: Path, original: Path, decoded: Path, work: Path, cache: Path) -> int:
    """One trained run on the original and the decoded test images: per-image mean and pooled Dice of each, and
    the paired per-image difference."""
    import torch

    from lvit.evaluate.testing import run_test

    summary = {"run": str(run), "machine": f"{torch.__version__}, {torch.get_num_threads()} thread(s)", "tests": {}}
    scores = {}
    for name, root in (("original", original), ("decoded", decoded)):
        out = work / f"test-run-on-{name}"
        m = run_test(run, root, "test", out, force=True, progress=False, cache_dir=cache, k=0)
        scores[name] = per_image(out)
        summary["tests"][name] = {"dice": m["model_resolution"]["mean_over_images"]["dice"],
                                  "pooled_dice": m["model_resolution"]["dataset_level"]["dice"],
                                  "image_size": m["model_resolution"]["image_size"]}
    summary["test_side"] = paired(scores["original"], scores["decoded"])
    (work / "summary-run.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qata", type=Path, required=True)
    p.add_argument("--pack", type=Path, default=REPO / ".devrun" / "qata")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--train", type=int, default=1200)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=("original", "packed"), default=None, help="train one of the two (parallel runs)")
    p.add_argument("--evaluate", action="store_true", help="test both trained models on both test copies")
    p.add_argument("--run", type=Path, default=None, help="test-side effect only, for this trained run")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from lvit.evaluate.testing import run_test
    from lvit.presets import preset_path
    from lvit.train.config import load_config
    from lvit.train.runner import train

    work, cache = args.work, args.pack / "text_cache"
    limits = {"train": args.train, "val": args.val, "test": None}
    roots = {"original": work / "original", "packed": work / "packed"}
    if not (roots["original"] / "prompts").is_dir():
        subset_of_originals(args.qata, roots["original"], limits)
    if not (roots["packed"] / "prompts").is_dir():
        full = work / "packed-full"
        if not (full / "prompts").is_dir():
            summary = _prepare().unpack_qata(args.pack, full, workers=args.threads + 1)
            assert not summary["problems"], summary["problems"][:3]
        subset_of_originals(full, roots["packed"], limits)
    if args.run is not None:
        return test_side_of_run(args.run, args.qata, work / "packed-full", work, work / "text-cache-run")
    if not args.evaluate:
        for copy in ([args.only] if args.only else ["original", "packed"]):
            config = load_config(preset_path("qata"), [
                "model.base_channels=8", "data.batch_size=8", "optim.lr=1e-3", f"trainer.max_epochs={args.epochs}",
                "trainer.patience=null", "trainer.progress=false", "data.num_workers=0", f"text.cache_dir={cache}"])
            started = time.time()
            result = train(config, roots[copy], work / f"run-{copy}", force=True)
            print(f"{copy}: {result.epochs} epochs, best val Dice {result.best_dice:.4f}, "
                  f"{(time.time() - started) / 60:.1f} min", flush=True)
        return 0
    summary = {"train": args.train, "val": args.val, "epochs": args.epochs, "tests": {}}
    scores = {}
    for model in ("original", "packed"):
        for data in ("original", "packed"):
            out = work / f"test-{model}-on-{data}"
            m = run_test(work / f"run-{model}", roots[data], "test", out, force=True, progress=False, cache_dir=cache,
                         k=0)
            scores[(model, data)] = per_image(out)
            summary["tests"][f"model trained on {model}, tested on {data}"] = {
                "dice": m["model_resolution"]["mean_over_images"]["dice"],
                "pooled_dice": m["model_resolution"]["dataset_level"]["dice"]}
    summary["test_side"] = {m: paired(scores[(m, "original")], scores[(m, "packed")]) for m in ("original", "packed")}
    summary["train_side"] = paired(scores[("original", "original")], scores[("packed", "original")])
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
