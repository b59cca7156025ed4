"""The bad-input corpus: broken or unusual files, generated from code into a copy of a good dataset.

Each :class:`BadInput` corrupts ONE thing in a dataset in the official layout (``Train_Folder/img``,
``labelcol``, ``Train_text.xlsx``) and says what lvit must do with it:

* ``valid=False``: the data is wrong. Every entry point (``lvit check-data``, ``lvit train``, ``lvit predict``)
  must stop with one line that names the offending file (``culprit``) and matches ``problem``;
* ``valid=True``: unusual but legal data (16-bit PNG, RGBA, a non-binary mask, odd Unicode): it must work.

The corpus is code rather than committed binaries so each case can be read (and extended) here, and so the
files always match the current synthetic dataset. ``tests/test_reliability_inputs.py`` runs it; so does
``bench/reliability.py`` (which records the counts in bench/RESULTS.md).
"""

from __future__ import annotations

import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRAIN = "Train_Folder"
VICTIM = "train_0000.png"  # the sample every case corrupts
VICTIM_MASK = f"mask_{VICTIM}"


@dataclass(frozen=True)
class BadInput:
    name: str
    what: str  # one line, for reports
    make: Callable[[Path], Path]  # corrupts the dataset at root; returns the file at fault
    valid: bool = False  # True: legal data that must be handled, not refused
    problem: str = ""  # regex the error / check-data line must match (invalid cases)
    level: str = "file"  # "file": found when a sample is read; "table": found when the table is read


# --------------------------------------------------------------------------------------------------
# Helpers


def image_path(root: Path) -> Path:
    return root / TRAIN / "img" / VICTIM


def mask_path(root: Path) -> Path:
    return root / TRAIN / "labelcol" / VICTIM_MASK


def table_path(root: Path) -> Path:
    return root / TRAIN / "Train_text.xlsx"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header_size(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims ``width x height`` 8-bit gray but holds ~no pixel data.

    Decoding it would allocate ``width * height`` bytes (10 GB for 100000 x 100000): a reader must refuse it
    from the header alone.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def _save(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")


def _rewrite_table(root: Path, edit: Callable, suffix: str = ".xlsx", encoding: str = "utf-8") -> Path:
    """Load Train_text.xlsx, apply ``edit(DataFrame) -> DataFrame``, write it back as ``suffix``."""
    import pandas as pd

    table = table_path(root)
    df = edit(pd.read_excel(table, dtype=object))
    if suffix == ".xlsx":
        df.to_excel(table, index=False)
        return table
    table.unlink()  # a CSV replaces the spreadsheet
    out = table.with_suffix(suffix)
    out.write_bytes(df.to_csv(index=False).encode(encoding))
    return out


def _set_report(root: Path, text: str) -> Path:
    def edit(df):
        df.loc[df["Image"] == VICTIM_MASK, "Description"] = text
        return df

    return _rewrite_table(root, edit)


# --------------------------------------------------------------------------------------------------
# The cases


def truncated_png(root: Path) -> Path:
    path = image_path(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def zero_byte_image(root: Path) -> Path:
    path = image_path(root)
    path.write_bytes(b"")
    return path


def text_as_image(root: Path) -> Path:
    path = image_path(root)
    path.write_text("Patient 0000: no image here, this is a note that was saved as .png\n")
    return path


def png_16bit(root: Path) -> Path:
    path = image_path(root)
    gray = _read_rgb(path).mean(axis=-1)
    _save(path, (gray * 257).astype(np.uint16))  # 16-bit grayscale ("I;16")
    return path


def png_rgba(root: Path) -> Path:
    path = image_path(root)
    rgb = _read_rgb(path)
    alpha = np.full(rgb.shape[:2] + (1,), 200, np.uint8)
    _save(path, np.concatenate([rgb, alpha], axis=-1))
    return path


def huge_dimensions(root: Path) -> Path:
    path = image_path(root)
    path.write_bytes(png_with_header_size(100_000, 100_000))  # 10 G pixels: PIL's decompression-bomb guard
    return path


def oversized_side(root: Path) -> Path:
    path = image_path(root)
    path.write_bytes(png_with_header_size(40_000, 20))  # under PIL's bomb limit, over lvit's 16384 px/side
    return path


def mask_other_size(root: Path) -> Path:
    path = mask_path(root)
    from PIL import Image

    with Image.open(path) as im:
        im.resize((im.width // 2, im.height // 2), Image.NEAREST).save(path, format="PNG")
    return path


def mask_non_binary(root: Path) -> Path:
    path = mask_path(root)
    from PIL import Image

    with Image.open(path) as im:
        mask = np.array(im.convert("L"))
    ramp = np.linspace(0, 255, mask.shape[1], dtype=np.float32)[None, :].repeat(mask.shape[0], 0)
    _save(path, ramp.astype(np.uint8))  # a soft (probability-like) mask: 0..255 gradient
    return path


def whitespace_report(root: Path) -> Path:
    return _set_report(root, " \t \n  ")


def latin1_csv(root: Path) -> Path:
    def edit(df):
        df.loc[df["Image"] == VICTIM_MASK, "Description"] = "Opacité basale droite, deux zones infectées."
        return df

    return _rewrite_table(root, edit, suffix=".csv", encoding="latin-1")


def mojibake_xlsx(root: Path) -> Path:
    # UTF-8 text once decoded as Latin-1 ("Ã©" for "é") and saved that way: garbled, flagged by check-data.
    return _set_report(root, "OpacitÃ© basale droite, deux zones infectÃ©es, lower right lung.")


def unicode_xlsx(root: Path) -> Path:
    # Legal odd characters: accents, CJK, emoji, a non-breaking space. Must train like any other report.
    return _set_report(root, "Opacité basale droite\u00a0— 右下肺 two infected areas 🫁, lower right lung.")


def missing_column(root: Path) -> Path:
    return _rewrite_table(root, lambda df: df.drop(columns=["Description"]))


def path_traversal(root: Path) -> Path:
    def edit(df):
        df.loc[df["Image"] == VICTIM_MASK, "Image"] = "../../../../../../etc/passwd"
        return df

    return _rewrite_table(root, edit)


CORPUS: list[BadInput] = [
    BadInput("truncated_png", "PNG cut in half", truncated_png, problem="truncated|unreadable"),
    BadInput("zero_byte", "0-byte image file", zero_byte_image, problem="empty file"),
    BadInput("text_as_image", "a text file named .png", text_as_image, problem="unreadable"),
    BadInput("png_16bit", "16-bit grayscale PNG", png_16bit, valid=True),
    BadInput("png_rgba", "RGBA PNG (alpha channel)", png_rgba, valid=True),
    BadInput("huge_dimensions", "PNG header claims 100000x100000", huge_dimensions,
             problem="too large|absurd image size|decompression"),
    BadInput("oversized_side", "PNG header claims 40000x20", oversized_side,
             problem="too large|absurd image size"),
    BadInput("mask_other_size", "mask half the image's size", mask_other_size, problem="differs from image size"),
    BadInput("mask_non_binary", "soft 0..255 gradient mask", mask_non_binary, problem="non-binary",
             valid=True),  # training binarises at 127 (documented); check-data still flags it
    BadInput("whitespace_report", "report of only whitespace", whitespace_report, problem="empty report",
             level="table"),
    BadInput("latin1_csv", "CSV table saved as Latin-1", latin1_csv, problem="not UTF-8", level="table"),
    BadInput("mojibake_xlsx", "xlsx cell with mojibake (Ã©)", mojibake_xlsx, problem="garbled",
             valid=True, level="table"),  # readable text: training uses it; check-data flags it
    BadInput("unicode_xlsx", "xlsx cell with accents, CJK, emoji, NBSP", unicode_xlsx, valid=True,
             level="table"),
    BadInput("missing_column", "table without the Description column", missing_column,
             problem="missing column 'Description'", level="table"),
    BadInput("path_traversal", "table names ../../etc/passwd", path_traversal,
             problem="outside the dataset folder", level="table"),
]

# Cases check-data must report even though training handles them (suspicious but usable data).
FLAGGED_BY_CHECK_DATA = {"mask_non_binary", "mojibake_xlsx"}


def make_case(case: BadInput, good_root: Path, dest: Path) -> tuple[Path, Path]:
    """Copy the dataset at ``good_root`` to ``dest`` and apply ``case``: (dataset root, file at fault)."""
    shutil.copytree(good_root, dest, ignore=shutil.ignore_patterns(".lvit_cache"))
    return dest, case.make(dest)


# --------------------------------------------------------------------------------------------------
# Running the CLI and counting outcomes (shared by the reliability tests and bench/reliability.py)

COUNTS_ENV = "LVIT_RELIABILITY_COUNTS"  # a JSON file the reliability tests add their counts to


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``lvit ARGV`` in this process: (exit code, stdout, stderr). An escaping exception is a test failure."""
    import contextlib
    import io

    from lvit.commands.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list[str]:
    """The ``error: ...`` lines of a CLI's stderr (tqdm bars and warnings may share the stream)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def assert_one_line_error(code: int, stderr: str, *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line, no traceback; the line contains every needle (regex). -> the line."""
    import re

    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert code == 2 and len(lines) == 1, (code, stderr)
    for needle in needles:
        assert re.search(needle, lines[0]), (needle, lines[0])
    return lines[0]


def half_written_files(folder: Path) -> list[Path]:
    """Temporary files of lvit.core.io and files that do not load completely (PNG, safetensors, ckpt, json)."""
    bad = []
    if not folder.exists():
        return bad
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.endswith(".tmp"):
            bad.append(path)
        elif not file_is_complete(path):
            bad.append(path)
    return bad


def file_is_complete(path: Path) -> bool:
    """True when ``path`` parses completely with the reader of its type (types lvit writes)."""
    import json

    try:
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                im.load()
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path))
        elif path.suffix == ".ckpt":
            import torch

            torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            yaml.safe_load(path.read_text(encoding="utf-8"))
        elif path.suffix == ".csv":
            import csv

            rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
            return bool(rows) and all(len(r) == len(rows[0]) for r in rows)
    except Exception:  # noqa: BLE001 - any parse failure means "not complete"
        return False
    return True


class Tally:
    """Counts of a test module (e.g. bad inputs tried / handled, faults injected / survived)."""

    def __init__(self, section: str):
        from collections import Counter

        self.section = section
        self.counts: Counter = Counter()

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def line(self) -> str:
        return f"reliability[{self.section}]: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))

    def report(self, request) -> None:
        """Print the counts on the terminal (past pytest's output capture) and add them to the JSON file."""
        self.dump()
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        capture = request.config.pluginmanager.getplugin("capturemanager")
        if reporter is None:
            return
        if capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line("\n" + self.line())
        else:
            reporter.write_line(self.line())

    def dump(self) -> None:
        """Merge the counts into the JSON file named by $LVIT_RELIABILITY_COUNTS (if set)."""
        import json
        import os

        target = os.environ.get(COUNTS_ENV)
        if not target:
            return
        path = Path(target)
        data = json.loads(path.read_text()) if path.is_file() else {}
        section = data.setdefault(self.section, {})
        for key, value in self.counts.items():
            section[key] = section.get(key, 0) + value
        from lvit.core.io import atomic_write_json

        atomic_write_json(path, data)


# --------------------------------------------------------------------------------------------------
# The user-path corpus: commands used the wrong way round (clashing outputs, odd reports, absent devices, stale
# exports, lossy batches, bad flags). Each case is one CLI call on a tiny trained run and says what must come
# out: an error (exit 2, ONE `error:` line naming the file or flag, nothing written), a warning (exit 0, a
# `warning:` line naming it), a partial batch (the good images written, the failures listed, exit 2), or plain
# success. tests/test_reliability_inputs.py runs them (test_user_path); bench/reliability.py counts them.

# A tiny LViT-T / LViT on 32 px images, one epoch (the same settings as tests/test_reliability_inputs.py).
TINY_TRAIN = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress",
              "--set", "model.image_size=32", "--set", "model.base_channels=8", "--set", "model.vit_heads=2",
              "--set", "data.augment=false"]


@dataclass
class UserPathContext:
    """What a case may use. ``tmp`` is the case's own folder (everything a case writes goes there); ``data``
    (the good dataset) and the two runs are shared: copy them (``copy_run``) before changing anything."""

    tmp: Path
    data: Path
    text_run: Path  # LViT reading reports (minilm), trained by this lvit: has report_words.json
    t_run: Path  # LViT-T (no text)

    @property
    def image(self) -> Path:
        """A test image copied into ``tmp`` (cases check it is never overwritten)."""
        path = self.tmp / "input.png"
        if not path.exists():
            shutil.copyfile(sorted((self.data / "Test_Folder" / "img").iterdir())[0], path)
        return path

    def copy_run(self, which: str = "t") -> Path:
        dest = self.tmp / f"run-{which}"
        shutil.copytree(self.text_run if which == "text" else self.t_run, dest)
        return dest

    def image_folder(self, n: int = 6) -> Path:
        folder = self.tmp / "imgs"
        folder.mkdir(exist_ok=True)
        for path in sorted((self.data / TRAIN / "img").iterdir())[:n]:
            shutil.copyfile(path, folder / path.name)
        return folder


@dataclass(frozen=True)
class UserPathCase:
    name: str
    group: str  # the row of the reliability table it counts in
    what: str
    argv: Callable[[UserPathContext], list]  # prepares files in ctx.tmp, returns the lvit command line
    expect: str  # "error" | "warning" | "partial" | "ok"
    needles: tuple[str, ...] = ()  # regexes the error line (or one warning line) must all match
    check: Callable | None = None  # check(ctx, stdout, stderr): further assertions
    before_model: bool = False  # must fail before any model is loaded


def _predict_one(ctx: UserPathContext, *extra, run: str = "text", text: str | None = "Left lung: one infected "
                 "area in the lower zone.") -> list:
    argv = ["predict", ctx.text_run if run == "text" else ctx.t_run, "--image", ctx.image]
    return argv + (["--text", text] if text is not None else []) + list(extra)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im)


def _unchanged_image(ctx: UserPathContext, out: str, err: str) -> None:
    first = sorted((ctx.data / "Test_Folder" / "img").iterdir())[0]
    assert ctx.image.read_bytes() == first.read_bytes(), "the input image was overwritten"


def _image_formats(ctx: UserPathContext, out: str, err: str) -> None:
    assert (ctx.tmp / "m.tif").read_bytes()[:4] in (b"II*\x00", b"MM\x00*"), "m.tif is not a TIFF"
    assert (ctx.tmp / "o.jpg").read_bytes()[:3] == b"\xff\xd8\xff", "o.jpg is not a JPEG"
    assert set(np.unique(_read_png(ctx.tmp / "m.tif"))) <= {0, 255}


def _onnx_stale(ctx: UserPathContext) -> list:
    """RUN/model.onnx exported, then the run's best weights change (as after `train --force` into the folder)."""
    from safetensors.torch import save_file

    from lvit.artifacts.runs import load_weights

    run = ctx.copy_run("t")
    code, _, err = run_cli(["export", run, "--onnx", run / "model.onnx"])
    assert code == 0, err
    best = run / "checkpoints" / "best.safetensors"
    tensors = load_weights(best)
    tensors["head.weight"], tensors["head.bias"] = -tensors["head.weight"], -tensors["head.bias"] + 1.0  # new logits
    save_file(tensors, str(best), metadata={"format": "lvit"})
    return ["predict", run, "--image", ctx.image, "--out", ctx.tmp / "onnx.png", "--prob", ctx.tmp / "onnx_prob.png",
            "--backend", "onnx"]


def _onnx_matches_torch(ctx: UserPathContext, out: str, err: str) -> None:
    run = ctx.tmp / "run-t"
    code, _, err = run_cli(["predict", run, "--image", ctx.image, "--out", ctx.tmp / "torch.png", "--prob",
                            ctx.tmp / "torch_prob.png"])
    assert code == 0, err
    onnx, torch_ = _read_png(ctx.tmp / "onnx_prob.png").astype(int), _read_png(ctx.tmp / "torch_prob.png").astype(int)
    assert np.abs(onnx - torch_).max() <= 1, "the ONNX backend did not use the run's current weights"
    # Sanity: the stale file really predicts otherwise (else this case could not fail).
    from lvit.artifacts.export import OnnxSegmenter
    from lvit.data import read_image
    from lvit.inference import Segmenter

    segmenter = Segmenter(run)
    batch = segmenter.preprocess(read_image(ctx.image))[None]
    assert float((OnnxSegmenter(run / "model.onnx")(batch) - segmenter.logits(batch)).abs().max()) > 1e-2


def _without_best(ctx: UserPathContext) -> list:
    run = ctx.copy_run("t")
    (run / "checkpoints" / "best.safetensors").unlink()
    return ["predict", run, "--image", ctx.image, "--out", ctx.tmp / "m.png"]


def _truncated_ckpt(ctx: UserPathContext) -> list:
    run = ctx.copy_run("t")
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:30_000])
    return ["predict", ckpt, "--image", ctx.image, "--out", ctx.tmp / "m.png"]


def _whole_sentence(ctx: UserPathContext, out: str, err: str) -> None:
    line = error_lines(err)[0]
    assert line.endswith(")") and "miniz" not in line and "..." not in line, line


def _old_run(ctx: UserPathContext) -> list:
    run = ctx.copy_run("text")
    (run / "report_words.json").unlink()  # as a run trained before lvit recorded its reports' words
    return ["predict", run, "--image", ctx.image, "--text", "Left lung: one infected area.", "--out", ctx.tmp / "m.png"]


def _table(ctx: UserPathContext, names: list[str], text: str = "Right lung: one infected area in the upper zone.",
           name: str = "reports.csv") -> Path:
    table = ctx.tmp / name
    table.write_text("Image,Description\n" + "".join(f"{n},{text}\n" for n in names), encoding="utf-8")
    return table


def _batch_skipped(ctx: UserPathContext) -> list:
    folder = ctx.image_folder(6)
    names = sorted(p.name for p in folder.iterdir())
    return ["predict", ctx.text_run, "--images", folder, "--reports", _table(ctx, names[:4]), "--out",
            ctx.tmp / "out", "--no-progress"]


def _skipped_listed(ctx: UserPathContext, out: str, err: str) -> None:
    masks = sorted(p.name for p in (ctx.tmp / "out" / "masks").iterdir())
    names = sorted(p.name for p in (ctx.tmp / "imgs").iterdir())
    assert masks == names[:4], masks
    listing = (ctx.tmp / "out" / "skipped.csv").read_text()
    assert all(f"{n},skipped," in listing for n in names[4:]), listing
    assert "predicted 4 of 6" in out, out
    assert "lvit predict" not in err, "--no-progress still drew a progress bar"


def _batch_bad_image(ctx: UserPathContext) -> list:
    folder = ctx.image_folder(6)
    sorted(folder.iterdir())[2].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a broken third image
    return ["predict", ctx.t_run, "--images", folder, "--out", ctx.tmp / "out", "--batch-size", "4", "--no-progress"]


def _others_written(ctx: UserPathContext, out: str, err: str) -> None:
    names = sorted(p.name for p in (ctx.tmp / "imgs").iterdir())
    masks = sorted(p.name for p in (ctx.tmp / "out" / "masks").iterdir())
    assert masks == [n for i, n in enumerate(names) if i != 2], masks
    assert f"{names[2]},failed," in (ctx.tmp / "out" / "skipped.csv").read_text()


def _batch_bad_table(ctx: UserPathContext) -> list:
    folder = ctx.image_folder(3)
    table = ctx.tmp / "reports.csv"
    table.write_text("Image,Report\n" + "".join(f"{p.name},left lung\n" for p in sorted(folder.iterdir())))
    return ["predict", ctx.text_run, "--images", folder, "--reports", table, "--out", ctx.tmp / "new" / "out"]


def _no_folder_left(ctx: UserPathContext, out: str, err: str) -> None:
    assert not (ctx.tmp / "new").exists(), "an empty output folder was left behind"


def _failed_train(ctx: UserPathContext) -> list:
    root = ctx.tmp / "data"
    shutil.copytree(ctx.data, root, ignore=shutil.ignore_patterns(".lvit_cache"))
    truncated_png(root)
    return ["train", "--config", "synth", "--data", root, "--out", ctx.tmp / "run", "--model", "lvit-t", *TINY_TRAIN]


def _retry_without_force(ctx: UserPathContext, out: str, err: str) -> None:
    assert not (ctx.tmp / "run").exists(), "the failed run left a stub folder"
    root = ctx.tmp / "data"
    shutil.copyfile(sorted((ctx.data / TRAIN / "img").iterdir())[0], image_path(root))  # repaired
    code, _, err = run_cli(["train", "--config", "synth", "--data", root, "--out", ctx.tmp / "run", "--model",
                            "lvit-t", *TINY_TRAIN])
    assert code == 0 and (ctx.tmp / "run" / "checkpoints" / "last.safetensors").is_file(), err


def _stub_run(ctx: UserPathContext) -> list:
    """The leftovers of a run killed before its first checkpoint: config.yaml, tensorboard/, empty checkpoints/."""
    stub = ctx.tmp / "run"
    (stub / "tensorboard").mkdir(parents=True)
    (stub / "checkpoints").mkdir()
    shutil.copyfile(ctx.t_run / "config.yaml", stub / "config.yaml")
    return ["train", "--config", "synth", "--data", ctx.data, "--out", stub, "--model", "lvit-t", *TINY_TRAIN]


def _trained(ctx: UserPathContext, out: str, err: str) -> None:
    assert (ctx.tmp / "run" / "checkpoints" / "last.safetensors").is_file()


def _model_info_run(ctx: UserPathContext, out: str, err: str) -> None:
    import json

    from lvit.artifacts.runs import load_run
    from lvit.models import count_parameters

    info = json.loads(out)
    assert info["parameters"] == count_parameters(load_run(ctx.text_run).model), info["parameters"]
    assert info["config"]["text_dim"] == 384


def _model_info_preset(ctx: UserPathContext, out: str, err: str) -> None:
    import json

    import torch

    from lvit.models import LViTConfig, build_model, count_parameters
    from lvit.presets import preset_path
    from lvit.train.config import load_config

    cfg = load_config(preset_path("synth"))
    with torch.device("meta"):
        model = build_model(cfg.model_name, LViTConfig(**{**cfg.model.to_dict(), "text_dim": 384}))
    assert json.loads(out)["parameters"] == count_parameters(model)  # the MiniLM width, as training sets it


def _existing_folder(ctx: UserPathContext) -> Path:
    folder = ctx.tmp / "folder"
    folder.mkdir(exist_ok=True)
    return folder


LONG_REPORT = ("Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung. "
               * 120)[:10_000]
SPEAKING = "Left lung: one infected area in the lower zone."

USER_PATH: list[UserPathCase] = [
    # Outputs of one image
    UserPathCase("out_clash", "predict outputs", "--out, --prob and --overlay name one file",
                 lambda c: _predict_one(c, "--out", c.tmp / "x.png", "--prob", c.tmp / "x.png", "--overlay",
                                        c.tmp / "x.png"), "error", (r"--out and --prob", r"x\.png"), before_model=True),
    UserPathCase("out_is_input", "predict outputs", "--out is the input image, with --force",
                 lambda c: _predict_one(c, "--out", c.image, "--force"), "error",
                 (r"--out", r"input\.png", "input image"), _unchanged_image, before_model=True),
    UserPathCase("prob_is_input", "predict outputs", "--prob is the input image",
                 lambda c: _predict_one(c, "--out", c.tmp / "m.png", "--prob", c.image, "--force"), "error",
                 (r"--prob", r"input\.png", "input image"), _unchanged_image, before_model=True),
    UserPathCase("out_jpg", "predict outputs", "--out m.jpg (a mask as lossy JPEG)",
                 lambda c: _predict_one(c, "--out", c.tmp / "m.jpg"), "error", (r"--out", r"m\.jpg", "JPEG"),
                 before_model=True),
    UserPathCase("out_no_extension", "predict outputs", "--out without an extension",
                 lambda c: _predict_one(c, "--out", c.tmp / "mask"), "error", (r"--out", r"mask", "no file extension"),
                 before_model=True),
    UserPathCase("out_formats", "predict outputs", "--out m.tif --overlay o.jpg: the formats they name",
                 lambda c: _predict_one(c, "--out", c.tmp / "m.tif", "--overlay", c.tmp / "o.jpg"), "ok",
                 check=_image_formats),
    UserPathCase("out_folder", "predict outputs", "--out names an existing folder",
                 lambda c: _predict_one(c, "--out", _existing_folder(c)), "error", (r"--out", r"folder", "is a folder"),
                 before_model=True),
    UserPathCase("out_folder_force", "predict outputs", "--out names an existing folder, with --force",
                 lambda c: _predict_one(c, "--out", _existing_folder(c), "--force"), "error",
                 (r"--out", "is a folder"), before_model=True),
    UserPathCase("out_parent_is_file", "predict outputs", "--out inside a path that is a file",
                 lambda c: _predict_one(c, "--out", c.image / "m.png"), "error", (r"input\.png", "not a folder"),
                 before_model=True),
    # Reports
    UserPathCase("long_report", "reports", "a 10,000-character report",
                 lambda c: _predict_one(c, "--out", c.tmp / "m.png", text=LONG_REPORT), "warning",
                 ("--text", "truncated", r"keeps 24 of its [\d,]+ tokens")),
    UserPathCase("emoji_report", "reports", "a report of emoji",
                 lambda c: _predict_one(c, "--out", c.tmp / "m.png", text="🫁 😷 🫁"), "warning",
                 ("--text", "no words")),
    UserPathCase("foreign_report", "reports", "a report in another language",
                 lambda c: _predict_one(c, "--out", c.tmp / "m.png", text="Opacité basale droite, 右下肺"), "warning",
                 ("--text", "far from the training reports", "0 of its")),
    UserPathCase("unknown_words", "reports", "a report of words never seen in training",
                 lambda c: _predict_one(c, "--out", c.tmp / "m.png", text="quantum banana spreadsheet"), "warning",
                 ("--text", "far from the training reports")),
    UserPathCase("text_to_lvit_t", "reports", "--text given to LViT-T (which ignores it)",
                 lambda c: _predict_one(c, "--out", c.tmp / "m.png", run="t", text=SPEAKING), "warning",
                 ("--text is ignored", "lvit-t")),
    UserPathCase("old_run_words", "reports", "a run without report_words.json (older lvit)",
                 _old_run, "warning", ("report_words.json", "not checked")),
    UserPathCase("batch_reports", "reports", "--reports with unknown-word and long reports (batch)",
                 lambda c: ["predict", c.text_run, "--images", c.image_folder(2), "--out", c.tmp / "out",
                            "--reports", _table(c, sorted(p.name for p in (c.tmp / "imgs").iterdir()), text="zzz qqq")],
                 "warning", ("--reports", r"2 report\(s\) are far from the training reports")),
    # Weights and exports
    UserPathCase("best_missing", "weights and ONNX", "no best.safetensors: last.safetensors is used",
                 _without_best, "warning", ("best.safetensors", r"using .*last\.safetensors")),
    UserPathCase("onnx_stale", "weights and ONNX", "RUN/model.onnx from older weights", _onnx_stale, "warning",
                 (r"model\.onnx", "other weights", "--force"), _onnx_matches_torch),
    UserPathCase("truncated_ckpt", "weights and ONNX", "a truncated last.ckpt", _truncated_ckpt, "error",
                 (r"last\.ckpt", "truncated or damaged"), _whole_sentence),
    # Batches
    UserPathCase("batch_skipped", "batch predict", "images without a row in --reports", _batch_skipped, "warning",
                 (r"2 image\(s\)", "no row", r"reports\.csv", r"skipped\.csv"), _skipped_listed),
    UserPathCase("batch_bad_image", "batch predict", "one unreadable image in --images", _batch_bad_image,
                 "partial", (r"1 image\(s\) could not be predicted", r"train_0002\.png", "truncated|unreadable"),
                 _others_written),
    UserPathCase("batch_bad_table", "batch predict", "a table without Description: no empty folder left",
                 _batch_bad_table, "error", (r"reports\.csv", "Description"), _no_folder_left, before_model=True),
    # Devices
    UserPathCase("predict_cuda", "devices", "predict --device cuda on a CPU-only torch",
                 lambda c: _predict_one(c, "--out", c.tmp / "m.png", "--device", "cuda:7"), "error",
                 ("--device cuda:7", "CUDA|cuda"), before_model=True),
    UserPathCase("predict_banana", "devices", "predict --device banana",
                 lambda c: _predict_one(c, "--out", c.tmp / "m.png", "--device", "banana"), "error",
                 ("--device banana", "not a device"), before_model=True),
    UserPathCase("test_banana", "devices", "test --device banana",
                 lambda c: ["test", c.t_run, "--data", c.data, "--out", c.tmp / "t", "--device", "banana"], "error",
                 ("--device banana",), before_model=True),
    UserPathCase("test_cuda", "devices", "test --device cuda:7 (no such GPU here)",
                 lambda c: ["test", c.t_run, "--data", c.data, "--out", c.tmp / "t", "--device", "cuda:7"], "error",
                 ("--device cuda:7",), before_model=True),
    # Flags, configs and retries
    UserPathCase("test_negative_k", "flags and retries", "test --k -3",
                 lambda c: ["test", c.t_run, "--data", c.data, "--out", c.tmp / "t", "--k", "-3"], "error",
                 ("--k", "-3"), before_model=True),
    UserPathCase("report_bad_layer", "flags and retries", "report --layers banana",
                 lambda c: ["report", c.t_run, "--layers", "banana", "--out", c.tmp / "r.html"], "error",
                 ("--layers banana", "explain .*--list-layers"), before_model=True),
    UserPathCase("set_nan_on_preset", "flags and retries", "--set optim.lr=nan with a preset",
                 lambda c: ["train", "--config", "synth", "--data", c.data, "--out", c.tmp / "run",
                            "--set", "optim.lr=nan"], "error", (r"^error: --set optim\.lr=nan", "finite"),
                 before_model=True),
    UserPathCase("set_bad_type_on_preset", "flags and retries", "--set optim.lr=fast with a preset",
                 lambda c: ["train", "--config", "synth", "--data", c.data, "--out", c.tmp / "run",
                            "--set", "optim.lr=fast"], "error", (r"^error: --set optim\.lr=fast", "number"),
                 before_model=True),
    UserPathCase("failed_train_retry", "flags and retries", "a failed train, then the retry without --force",
                 _failed_train, "error", (r"train_0000\.png", "truncated|unreadable"), _retry_without_force),
    UserPathCase("stub_run_retry", "flags and retries", "train into the stub of a run killed before a checkpoint",
                 _stub_run, "warning", ("removed the leftovers", r"config\.yaml"), _trained),
    UserPathCase("model_info_run", "flags and retries", "model-info RUN (a MiniLM run)",
                 lambda c: ["model-info", c.text_run, "--json"], "ok", check=_model_info_run),
    UserPathCase("model_info_run_config", "flags and retries", "model-info RUN/config.yaml",
                 lambda c: ["model-info", "--config", c.text_run / "config.yaml", "--json"], "ok",
                 check=_model_info_run),
    UserPathCase("model_info_preset", "flags and retries", "model-info --config synth counts 384-d MiniLM text",
                 lambda c: ["model-info", "--config", "synth", "--json"], "ok", check=_model_info_preset),
    # Inputs before the model
    UserPathCase("predict_missing_image", "inputs checked first", "predict --image that does not exist",
                 lambda c: ["predict", c.text_run, "--image", c.tmp / "nothere.png", "--text", SPEAKING, "--out",
                            c.tmp / "m.png"], "error", (r"nothere\.png", "not found"), before_model=True),
    UserPathCase("predict_missing_folder", "inputs checked first", "predict --images that does not exist",
                 lambda c: ["predict", c.t_run, "--images", c.tmp / "nothere", "--out", c.tmp / "out"], "error",
                 (r"nothere", "not found"), before_model=True),
    UserPathCase("test_missing_data", "inputs checked first", "test --data that does not exist",
                 lambda c: ["test", c.t_run, "--data", c.tmp / "nodata", "--out", c.tmp / "t"], "error",
                 (r"nodata", "not found"), before_model=True),
    UserPathCase("test_out_not_empty", "inputs checked first", "test --out a non-empty folder",
                 lambda c: ["test", c.t_run, "--data", c.data, "--out", c.image.parent], "error",
                 ("not empty", "--force"), before_model=True),
    UserPathCase("explain_missing_image", "inputs checked first", "explain --image that does not exist",
                 lambda c: ["explain", c.t_run, "--image", c.tmp / "nothere.png", "--out", c.tmp / "ex"], "error",
                 (r"nothere\.png",), before_model=True),
]
