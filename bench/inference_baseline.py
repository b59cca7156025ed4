"""What lvit's inference answers, recorded so that a change meant to keep behaviour can prove it did.

    python bench/inference_baseline.py record [--sample ../shared/datasets/QaTa-COV19-sample]
    python bench/inference_baseline.py remeasure    # the committed runs kept, their answers recorded anew
    python bench/inference_baseline.py check

``record`` trains two tiny runs once and keeps them (weights and config only) in ``tests/fixtures/inference/``:

* ``demo-run``: ``lvit demo`` (synth preset, LViT, shrunk to 64 px / width 4 / 15 epochs so that the fixture is
  small; its data are regenerated from the seed by the test);
* ``qata-run``: ``lvit train`` (qata-cpu preset, shrunk the same way, 12 epochs) on the shared QaTa-COV19 sample,
  with a report writer trained for it by ``lvit train-reporter`` (``qata-run/reporter``).

Then it measures, through the commands a user runs: the per-image Dice of ``lvit test`` on each run's test split,
the sha256 of the masks ``lvit predict --images`` writes for five images with their reports and (QaTa, through
the report writer) without them, and of one ``lvit predict --image`` mask with ``--text`` (and one without),
the reports the writer wrote, and the app's answer for one image (message, notes, the sha256 of the overlay and
probability pictures and the 8x8 block means of the Grad-CAM picture, whose last bits vary between CPUs).
``baseline.json`` holds them; ``tests/test_inference_baseline.py`` recomputes them and requires equality (a change
of behaviour on purpose re-records, in its own commit, saying why). ``check`` recomputes and prints the differences.

Weights are committed, not retrained by the test, because CPU training is bit-identical on one machine only.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from benchkit import REPO

FIXTURES = REPO / "tests" / "fixtures" / "inference"
BASELINE = FIXTURES / "baseline.json"
DEFAULT_SAMPLE = REPO.parent / "shared" / "datasets" / "QaTa-COV19-sample"
TINY = ["model.image_size=64", "model.base_channels=4", "model.vit_heads=2", "data.batch_size=8",
        "trainer.progress=false", "data.num_workers=0"]
DEMO = {"n_train": 40, "n_val": 8, "n_test": 8, "seed": 0, "size": 64}
N_PREDICT = 5
KEEP = ("config.yaml", "report_words.json", "checkpoints/best.safetensors", "reporter/reporter.json",
        "reporter/weights.safetensors")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lvit(*argv: str) -> str:
    """Run ``lvit ARGV`` in this process; its printed output (an error exits)."""
    from lvit.commands.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([str(a) for a in argv])
    if code:
        raise SystemExit(f"lvit {' '.join(map(str, argv))} exited {code}:\n{buf.getvalue()}")
    return buf.getvalue()


def demo_data(where: Path) -> Path:
    """The demo run's dataset, regenerated from its seed (``lvit demo`` writes the same)."""
    from lvit.data import generate_synthetic

    return generate_synthetic(where, n_train=DEMO["n_train"], n_val=DEMO["n_val"], n_test=DEMO["n_test"],
                              size=DEMO["size"], seed=DEMO["seed"], force=True, progress=False)


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _keep(run: Path, dest: Path) -> None:
    for name in KEEP:
        if (run / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run / name, dest / name)


def train_fixtures(sample: Path, work: Path) -> None:
    _lvit("demo", "--out", work / "demo", "--n-train", DEMO["n_train"], "--n-val", DEMO["n_val"], "--n-test",
          DEMO["n_test"], *_sets(*TINY, "trainer.max_epochs=15", "optim.t0=15"))
    _lvit("train", "--config", "qata-cpu", "--data", sample, "--out", work / "qata",
          *_sets(*TINY, "trainer.max_epochs=12", "optim.t0=12"))
    _lvit("train-reporter", work / "qata", "--data", sample, "--epochs", 6, "--width", 4, "--image-size", 64,
          "--threads", 1)
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    _keep(work / "demo" / "run", FIXTURES / "demo-run")
    _keep(work / "qata", FIXTURES / "qata-run")


def _split_images(root: Path, split: str) -> list:
    from lvit.data import load_split

    return sorted(load_split(root, split), key=lambda r: r.name)[:N_PREDICT]


def _predict_folder(run: Path, records, work: Path, with_reports: bool) -> dict:
    """``lvit predict --images`` on copies of ``records``' images: sha256 per mask (and the written reports)."""
    images = work / "images"
    images.mkdir(parents=True)
    for r in records:
        shutil.copyfile(r.image_path, images / r.image_path.name)
    argv = ["predict", run, "--images", images, "--out", work / "out", "--no-progress"]
    if with_reports:
        table = work / "reports.csv"
        with table.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Image", "Description"])
            writer.writerows([(r.image_path.name, r.text) for r in records])
        argv += ["--reports", table]
    _lvit(*argv)
    out = {"masks": {p.name: sha256(p.read_bytes()) for p in sorted((work / "out" / "masks").glob("*.png"))}}
    generated = work / "out" / "reports.csv"
    if generated.is_file():
        with generated.open() as f:
            out["reports"] = {row["image"]: row["report"] for row in csv.DictReader(f)}
    return out


def _predict_one(run: Path, record, work: Path, with_report: bool) -> dict:
    """``lvit predict --image`` (``--text`` or, without it, the report writer): sha256 of the mask (and the
    report written beside it)."""
    work.mkdir(parents=True)
    argv = ["predict", run, "--image", record.image_path, "--out", work / "mask.png"]
    if with_report:
        argv += ["--text", record.text]
    _lvit(*argv)
    out = {"mask": sha256((work / "mask.png").read_bytes())}
    written = work / "mask.report.txt"
    if written.is_file():
        out["report"] = written.read_text()
    return out


def _test_dice(run: Path, data: Path, work: Path) -> dict:
    _lvit("test", run, "--data", data, "--split", "test", "--out", work, "--no-progress")
    with (work / "per_image.csv").open() as f:
        return {row["name"]: row["dice"] for row in csv.DictReader(f)}  # as written: exact digits


def _app(run: Path, record) -> dict:
    from lvit.commands.webapp import Page

    segmenter = Page(run)
    try:
        result = segmenter.segment(str(record.image_path), record.text)
        pictures = {name: sha256(np.ascontiguousarray(getattr(result, name)).tobytes())
                    for name in ("overlay", "probability")}
        pictures[GRADCAM_KEY] = block_means(result.gradcam)
        return {"message": result.message, "notes": result.notes, "pictures": pictures,
                "mask_file": sha256(Path(result.mask_file).read_bytes())}
    finally:
        segmenter.close()


#: Grad-CAM's heat map comes from gradients whose last bits differ from one CPU to another (the masks, thresholded,
#: do not): it is compared by its 8x8 block means, within GRADCAM_TOLERANCE of 255, not by its bytes.
GRADCAM_KEY = "gradcam_block_means"
GRADCAM_TOLERANCE = 1.0


def block_means(picture: np.ndarray, blocks: int = 8) -> list:
    """``H x W x C`` uint8 -> ``blocks x blocks x C`` means, rounded to 0.01 (a JSON list)."""
    h, w = picture.shape[:2]
    rows = np.array_split(np.arange(h), blocks)
    cols = np.array_split(np.arange(w), blocks)
    means = [[picture[r[0]:r[-1] + 1, c[0]:c[-1] + 1].reshape(-1, picture.shape[-1]).mean(0).round(2).tolist()
              for c in cols] for r in rows]
    return means


def measure(sample: Path, fixtures: Path = FIXTURES) -> dict:
    """Every recorded answer, recomputed from the committed fixtures."""
    import torch

    torch.set_num_threads(1)  # the arithmetic of one thread, whatever the machine's count
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = demo_data(tmp / "demo-data")
        demo, qata = fixtures / "demo-run", fixtures / "qata-run"
        demo_records, qata_records = _split_images(data, "test"), _split_images(sample, "test")
        return {
            "demo": {"test_dice": _test_dice(demo, data, tmp / "t1"),
                     "predict_with_reports": _predict_folder(demo, demo_records, tmp / "p1", True),
                     "predict_one_with_text": _predict_one(demo, demo_records[1], tmp / "o1", True),
                     "app": _app(demo, demo_records[0])},
            "qata": {"test_dice": _test_dice(qata, sample, tmp / "t2"),
                     "predict_with_reports": _predict_folder(qata, qata_records, tmp / "p2", True),
                     "predict_without_reports": _predict_folder(qata, qata_records, tmp / "p3", False),
                     "predict_one_with_text": _predict_one(qata, qata_records[1], tmp / "o2", True),
                     "predict_one_without_text": _predict_one(qata, qata_records[2], tmp / "o3", False),
                     "app": _app(qata, qata_records[0])},
        }


def differences(expected, actual, where: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{where}/{k}: missing" for k in expected if k not in actual]
        out += [f"{where}/{k}: not in the baseline" for k in actual if k not in expected]
        for k in expected:
            if k in actual:
                out += differences(expected[k], actual[k], f"{where}/{k}")
        return out
    if where.endswith("/" + GRADCAM_KEY):
        gap = float(np.abs(np.asarray(expected, float) - np.asarray(actual, float)).max())
        return [] if gap <= GRADCAM_TOLERANCE else [f"{where}: block means differ by up to {gap:.2f}"]
    return [] if expected == actual else [f"{where}: {expected!r} -> {actual!r}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("record", "remeasure", "check"):
        s = sub.add_parser(name)
        s.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="the shared QaTa-COV19 sample")
    args = p.parse_args(argv)
    if not args.sample.is_dir():
        print(f"error: {args.sample}: the shared QaTa-COV19 sample is not there", file=sys.stderr)
        return 2
    if args.command in ("record", "remeasure"):  # remeasure: the committed runs kept, their answers recomputed
        import torch

        torch.set_num_threads(1)
        before = json.loads(BASELINE.read_text()) if BASELINE.is_file() else {}
        if args.command == "record":
            with tempfile.TemporaryDirectory() as tmp:
                train_fixtures(args.sample, Path(tmp))
        baseline = {"about": "bench/inference_baseline.py record; tests/test_inference_baseline.py compares",
                    "demo_data": DEMO, **measure(args.sample)}
        BASELINE.write_text(json.dumps(baseline, indent=1, sort_keys=True) + "\n")
        if args.command == "remeasure":
            changed = differences({k: v for k, v in before.items() if k != "about"},
                                  {k: v for k, v in baseline.items() if k != "about"})
            print("\n".join(changed) or "no answer changed")
        size = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
        print(f"recorded {BASELINE} ({size / 1024:.0f} KiB of fixtures)")
        return 0
    expected = json.loads(BASELINE.read_text())
    found = differences({k: v for k, v in expected.items() if k not in ("about", "demo_data")}, measure(args.sample))
    print("\n".join(found) if found else "identical to the baseline")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
