"""Cases of "Runs, folders and masks a user can trust": each a real command line on small real files, run against a
given lvit source tree, with what the user got (the outcome) in one phrase.

Used by ``python bench/reliability.py --cases [--before REV]``, which runs every case on an earlier commit's code
and on this checkout's and writes bench/reliability_cases.json and the RESULTS.md section "trust". A case returns
``(kind, detail)``: kind is ``handled`` (the promised one-line error or warning, or the right answer, nothing
damaged), ``silent`` (a surprise nobody is told about), ``wrong`` (a wrong answer given as right) or
``traceback``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TINY = ["--config", "synth", "--no-progress", "--workers", "0", "--batch-size", "3", "--set", "model.image_size=32",
        "--set", "model.base_channels=8", "--set", "model.vit_heads=4"]


class Tree:
    """An lvit source tree and a scratch folder: runs its command line and its Python."""

    def __init__(self, src: Path, work: Path):
        self.src, self.work = Path(src), Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": str(self.src), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        # `python -m lvit` where the tree has lvit/__main__.py; older trees ran their CLI as lvit.cli
        self.module = "lvit" if (self.src / "lvit" / "__main__.py").is_file() else "lvit.cli"

    def cli(self, *args, timeout: float = 600, memory_gb: float | None = None) -> tuple[int, str, str]:
        limit = None
        if memory_gb is not None:
            import resource

            def limit():  # a runaway allocation fails in the child, never on the machine
                size = int(memory_gb * 2 ** 30)
                resource.setrlimit(resource.RLIMIT_AS, (size, size))
        try:
            done = subprocess.run([sys.executable, "-m", self.module, *map(str, args)], cwd=self.work, env=self.env,
                                  capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
        except subprocess.TimeoutExpired:
            return -9, "", f"(no answer within {timeout:.0f} s)"
        return done.returncode, done.stdout, done.stderr

    def python(self, code: str) -> str:
        done = subprocess.run([sys.executable, "-c", code], cwd=self.work, env=self.env, capture_output=True,
                              text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"helper failed: {done.stderr[-500:]}")
        return done.stdout

    # shared set-up, made with this tree's own code
    def data(self, name: str = "data", seed: int = 0) -> Path:
        path = self.work / name
        if not path.exists():
            self.cli("synth", path, "--n-train", 6, "--n-val", 2, "--n-test", 2, "--size", 64, "--seed", seed)
        return path

    def run(self, name: str = "run", *extra) -> Path:
        path = self.work / name
        if not path.exists():
            code, _, err = self.cli("train", "--data", self.data(), "--out", path, "--epochs", 1, *TINY, *extra)
            if code:
                raise RuntimeError(f"training the case run failed: {err[-300:]}")
        return path

    def copy(self, source: Path, name: str) -> Path:
        target = self.work / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        return target


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if any("Traceback" in line for line in lines) else lines[0])[:160] if lines else ""


def _error_kind(code: int, err: str) -> str | None:
    if "Traceback" in err:
        return "traceback"
    if code == 2 and err.strip().startswith("error:") and err.strip().count("\n") == 0:
        return "handled"
    return None


# --------------------------------------------------------------------------------------------------------------
# Run folders


def resume_with_a_setting_that_cannot_change(t: Tree):
    run = t.copy(t.run(), "resume-width")
    before = _tree_bytes(run)
    code, _, err = t.cli("train", "--out", run, "--resume", "--set", "model.base_channels=32", "--no-progress")
    changed = _tree_bytes(run) != before
    kind = _error_kind(code, err)
    if kind == "handled" and not changed:
        return "handled", "refused in one line; run folder byte-for-byte unchanged"
    plain, _, perr = t.cli("train", "--out", run, "--resume", "--epochs", 2, "--no-progress")
    return kind or "silent", (f"exit {code}: {_first_line(err)}; run folder {'changed' if changed else 'unchanged'}"
                              f"; a plain --resume afterwards: exit {plain}")


def two_trainings_into_one_folder(t: Tree):
    run = t.work / "busy"
    shutil.rmtree(run, ignore_errors=True)
    first = subprocess.Popen([sys.executable, "-m", t.module, "train", "--data", str(t.data()), "--out", str(run),
                              "--epochs", "2000", *TINY], cwd=t.work, env=t.env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # until the first training has written its first epoch
            if (run / "metrics.csv").is_file():
                break
            time.sleep(0.1)
        code, _, err = t.cli("train", "--data", t.data(), "--out", run, "--epochs", 1, *TINY, "--force")
        alive = first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    kind = _error_kind(code, err)
    if kind == "handled" and "in use" in err:
        return "handled", "the second training is refused in one line while the first runs"
    return kind or "silent", (f"the second training (--force) ran into the live run folder: exit {code}; first "
                              f"training {'still running' if alive else 'ended'} meanwhile")


def resume_on_other_data(t: Tree):
    run = t.copy(t.run(), "resume-data")
    other = t.data("other", seed=7)
    code, _, err = t.cli("train", "--out", run, "--resume", "--epochs", 2, "--data", other, "--no-progress")
    if code == 0 and "other data" in err:
        return "handled", "trains on, with a one-line warning naming both datasets; config.yaml keeps the history"
    return _error_kind(code, err) or "silent", f"exit {code}, nothing said about the other dataset"


def init_from_another_width(t: Tree):
    wide = t.run("wide", "--set", "model.base_channels=16")
    target = t.work / "narrow"
    shutil.rmtree(target, ignore_errors=True)
    code, out, err = t.cli("train", "--data", t.data(), "--out", target, "--epochs", 1, *TINY, "--init-from", wide)
    kind = _error_kind(code, err)
    if kind == "handled" and "no part" in err:
        return "handled", "refused in one line: no part of the network matches (" + err.split("(")[1].split(")")[0] \
            + ")"
    if code == 0:
        report = json.loads((target / "init_from.json").read_text())
        said = "printed" if "tensors loaded" in out else "nothing printed"
        return "silent", f"started from {report['counts']['loaded']} matching tensors ({said})"
    return kind or "silent", f"exit {code}: {_first_line(err)}"


# --------------------------------------------------------------------------------------------------------------
# Artifacts that go stale


def export_after_the_weights_changed(t: Tree):
    run = t.copy(t.run(), "stale")
    t.cli("test", run, "--data", t.data(), "--no-progress", "--k", 0)
    t.python(f"""
import torch
try:
    from lvit.artifacts.runs import load_run, save_weights
except ImportError:  # trees before the artifacts/ package
    from lvit.runs import load_run, save_weights
r = load_run({str(run)!r})
with torch.no_grad():
    r.model.head.bias.add_(1.0)
save_weights({str(run / 'checkpoints' / 'best.safetensors')!r}, r.model)
""")
    code, _, err = t.cli("export", run, "--hf", t.work / "stale-folder")
    shutil.rmtree(t.work / "stale-folder-ok", ignore_errors=True)
    tests = json.loads((t.work / "stale-folder" / "config.json").read_text())["metrics"]["test"] if code == 0 else []
    shutil.rmtree(t.work / "stale-folder", ignore_errors=True)
    if code == 0 and not tests and "other weights" in err:
        return "handled", "the metrics of the earlier weights are left out of the card, with a one-line warning"
    if code == 0 and tests:
        return "wrong", f"the card states test Dice {tests[0]['dice']:.4f}, measured on other weights"
    return _error_kind(code, err) or "silent", f"exit {code}: {_first_line(err)}"


def forced_predict_after_a_generated_report(t: Tree):
    image = sorted((t.data() / "Test_Folder" / "img").iterdir())[0]
    out = t.work / "forced"
    out.mkdir(exist_ok=True)
    (out / "m.report.txt").write_text("a report written for the earlier mask\n")
    (out / "m.png").write_bytes(b"")
    code, _, err = t.cli("predict", t.run(), "--image", image, "--text", "left lung lower zone", "--out",
                         out / "m.png", "--force")
    stale = (out / "m.report.txt").exists()
    if code == 0 and not stale:
        return "handled", "the earlier mask's generated report is removed (and said so)"
    return "silent" if code == 0 else (_error_kind(code, err) or "silent"), \
        "m.report.txt of the earlier mask stays beside the new mask"


def export_of_a_run_with_a_report_writer(t: Tree):
    run = t.copy(t.run(), "with-writer")
    code, _, err = t.cli("train-reporter", run, "--data", t.data(), "--epochs", 1, "--image-size", 32, "--width", 4,
                         "--no-progress")
    if code:
        return _error_kind(code, err) or "silent", f"train-reporter: {_first_line(err)}"
    folder = t.work / "writer-folder"
    shutil.rmtree(folder, ignore_errors=True)
    t.cli("export", run, "--hf", folder)
    if (folder / "reporter" / "reporter.json").is_file():
        return "handled", "the model folder carries the report writer (reporter/)"
    return "silent", "the model folder has no report writer: predict without a report fails there"


# --------------------------------------------------------------------------------------------------------------
# Inputs that are valid but unusual


def mask_saved_with_label_127(t: Tree):
    code = f"""
import numpy as np
from PIL import Image
m = np.zeros((224, 224), np.uint8); m[160:200, 20:80] = 127
Image.fromarray(m).save({str(t.work / 'mask127.png')!r})
"""
    t.python(code)
    _, out, err = t.cli("describe", t.work / "mask127.png")
    said = out.strip().splitlines()[-1] if out.strip() else err.strip()
    if "lower left lung" in said:
        return "handled", f"described as \"{said}\""
    return "wrong", f"described as \"{said}\""


def weights_that_are_nan(t: Tree):
    run = t.copy(t.run(), "nan")
    t.python(f"""
from safetensors.torch import load_file, save_file
import torch
p = {str(run / 'checkpoints' / 'best.safetensors')!r}
w = load_file(p)
save_file({{k: torch.full_like(v, float('nan')) if v.is_floating_point() else v for k, v in w.items()}}, p)
""")
    image = sorted((t.data() / "Test_Folder" / "img").iterdir())[0]
    code, _, err = t.cli("predict", run, "--image", image, "--text", "left lung lower zone", "--out",
                         t.work / "nan.png", "--force")
    kind = _error_kind(code, err)
    if kind == "handled":
        return "handled", "refused at load in one line (NaN or infinity in the weights)"
    return kind or "wrong", f"exit {code}: a mask was written from NaN weights"


def absurd_size_in_config_json(t: Tree):
    folder = t.work / "absurd"
    shutil.rmtree(folder, ignore_errors=True)
    t.cli("export", t.run(), "--hf", folder)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["base_channels"] = 1_000_000_000
    (folder / "config.json").write_text(json.dumps(config))
    image = sorted((t.data() / "Test_Folder" / "img").iterdir())[0]
    code, _, err = t.cli("predict", folder, "--image", image, "--text", "left lung", "--out", t.work / "a.png",
                         "--force", timeout=120, memory_gb=6)
    kind = _error_kind(code, err)
    if kind == "handled" and "base_channels" in err:
        return "handled", "refused in one line naming base_channels"
    return kind or "silent", f"exit {code}: {_first_line(err)}"


def report_writer_worse_than_the_most_frequent_report(t: Tree):
    same = t.copy(t.data(), "same-reports")
    t.python(f"""
import pandas as pd, pathlib
for table in pathlib.Path({str(same)!r}).glob('*/*_text.xlsx'):
    f = pd.read_excel(table); f['Description'] = 'unilateral pulmonary infection, one infected area, lower left lung.'
    f.to_excel(table, index=False)
""")
    code, _, err = t.cli("train-reporter", "--data", same, "--out", t.work / "weak-writer", "--epochs", 1,
                         "--image-size", 32, "--width", 4, "--no-progress", "--force")
    if code == 0 and "no better than" in err:
        return "handled", "a one-line warning at training; reporter.json records it"
    return _error_kind(code, err) or "silent", "saved without a word (it can only tie the most frequent report)"


def report_sharing_one_known_word(t: Tree):
    image = sorted((t.data() / "Test_Folder" / "img").iterdir())[0]
    code, _, err = t.cli("predict", t.run(), "--image", image, "--text", "The patient feels fine today and went home",
                         "--out", t.work / "free.png", "--force")
    if code == 0 and "warning" in err and "far from the training reports" in err:
        return "handled", "a one-line warning: the report is far from the training reports"
    return _error_kind(code, err) or "silent", "a mask, no warning"


def output_into_a_closed_pipe(t: Tree):
    proc = subprocess.Popen([sys.executable, "-m", t.module, "model-info", "--config", "synth"], cwd=t.work,
                            env=t.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    if "Traceback" in err:
        return "traceback", _first_line(err)
    return "handled", f"ends quietly (exit {code})"


def kill_in_epoch_two_then_resume(t: Tree):
    """`kill -9` of a training with DataLoader workers inside its second epoch, then --resume: the resumed run
    must end where the uninterrupted one does (every epoch's losses and the final weights)."""
    data = t.work / "data-kill"
    if not data.exists():
        t.cli("synth", data, "--n-train", 16, "--n-val", 2, "--n-test", 1, "--size", 32, "--seed", 0)
    args = ["--data", data, "--epochs", 3, "--config", "synth", "--batch-size", 2, "--workers", 2, "--no-progress",
            "--set", "model.image_size=32", "--set", "model.base_channels=8", "--set", "model.vit_heads=2",
            "--set", "optim.t0=2"]
    ref, run = t.work / "kill-ref", t.work / "kill-run"
    for folder in (ref, run):
        shutil.rmtree(folder, ignore_errors=True)
    code, _, err = t.cli("train", "--out", ref, *args)
    if code:
        raise RuntimeError(f"the uninterrupted run failed: {err[-300:]}")
    epoch_seconds = min(float(row["seconds"]) for row in _metrics_rows(ref)[1:])  # without the start-up
    proc = subprocess.Popen([sys.executable, "-m", t.module, "train", "--out", str(run), *map(str, args)],
                            cwd=t.work, env=t.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last = run / "checkpoints" / "last.ckpt"
    for _ in range(6000):
        if last.is_file() or proc.poll() is not None:
            break
        time.sleep(0.05)
    time.sleep(0.3 * epoch_seconds)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its DataLoader workers
    except ProcessLookupError:
        pass
    killed_after = len(_metrics_rows(run))
    code, _, err = t.cli("train", "--out", run, "--resume", "--no-progress")
    if code:
        return _error_kind(code, err) or "silent", f"--resume failed: exit {code}: {_first_line(err)}"
    ref_rows, rows = _metrics_rows(ref), _metrics_rows(run)
    same_rows = [{k: v for k, v in r.items() if k != "seconds"} for r in ref_rows] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    same_weights = _same_tensors(ref / "checkpoints" / "last.safetensors", run / "checkpoints" / "last.safetensors")
    where = f"killed after {killed_after} finished epoch(s)"
    if same_rows and same_weights:
        return "handled", f"{where}; the resumed run equals the uninterrupted one (every epoch, final weights)"
    diff = next((f"epoch {a['epoch']} train loss {a['train_loss']} vs {b['train_loss']} uninterrupted"
                 for a, b in zip(rows, ref_rows) if a["train_loss"] != b["train_loss"]), "same losses")
    return "wrong", f"{where}; resumed: {diff}; final weights {'equal' if same_weights else 'differ'}"


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same tensors, bit for bit (their metadata may differ)."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _metrics_rows(run: Path) -> list[dict]:
    import csv

    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


CASES = {
    "run folders": [resume_with_a_setting_that_cannot_change, two_trainings_into_one_folder, resume_on_other_data,
                    init_from_another_width, kill_in_epoch_two_then_resume],
    "artifacts that go stale": [export_after_the_weights_changed, forced_predict_after_a_generated_report,
                                export_of_a_run_with_a_report_writer],
    "inputs valid but unusual": [mask_saved_with_label_127, weights_that_are_nan, absurd_size_in_config_json,
                                 report_writer_worse_than_the_most_frequent_report, report_sharing_one_known_word,
                                 output_into_a_closed_pipe],
}


def run_cases(src: Path, work: Path, log=print) -> dict:
    """{case name: {"class", "kind", "detail", "seconds"}} of every case on the tree ``src``."""
    tree = Tree(src, work)
    results = {}
    for klass, cases in CASES.items():
        for case in cases:
            started = time.perf_counter()
            try:
                kind, detail = case(tree)
            except Exception as exc:  # noqa: BLE001 - a case that cannot run is recorded, not fatal
                kind, detail = "not run", f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            results[case.__name__] = {"class": klass, "kind": kind, "detail": detail,
                                      "seconds": round(time.perf_counter() - started, 1)}
            log(f"  {case.__name__}: {kind} ({detail})")
    return results
