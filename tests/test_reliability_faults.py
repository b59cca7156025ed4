"""Faults during training: SIGKILL at random moments, a full disk, a read-only folder, NaN loss.

* Kill and resume: a real ``lvit train`` subprocess is SIGKILLed several times (seeded random delays: during
  the first epoch, in the middle of a later epoch, and while ``last.ckpt`` is being written, widened with
  ``LVIT_FAULT_INJECT=write_delay``), each time resumed with ``--resume``. Asserted: after every kill each
  file of the run folder is either absent or complete (only lvit.core.io's hidden ``*.tmp`` files may be
  half-written, and the next write reaps them); the final weights (last and best) and metrics.csv equal
  those of an uninterrupted run EXACTLY (training is deterministic on CPU, and a resume recomputes the
  interrupted epoch from the last full-state checkpoint).
* Disk full / read-only: simulated in-process (``LVIT_FAULT_INJECT=enospc|eacces``: tests run as root,
  where permission bits do not stop writes): one ``error:`` line, and the previous checkpoint is intact.
* NaN: the run stops with one line and keeps the last good checkpoint; gradient clipping is honoured.
"""

from __future__ import annotations

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from badinputs import Tally, assert_one_line_error, file_is_complete, run_cli

from lvit.core.io import FAULT_ENV

TINY = ["--config", "synth", "--model", "lvit-t", "--batch-size", "2", "--workers", "0", "--no-progress",
        "--set", "model.image_size=32", "--set", "model.base_channels=8", "--set", "model.vit_heads=2",
        "--set", "data.augment=true", "--set", "optim.t0=2"]  # augmentation + warm restarts: RNG and
# scheduler state must both survive the kills for the final weights to match


@pytest.fixture(scope="module")
def tally(request):
    t = Tally("faults")
    yield t
    t.report(request)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from lvit.data import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("faults") / "data", n_train=8, n_val=2, n_test=1, size=32,
                              seed=0, progress=False)


def read_rows(run: Path) -> list[dict]:
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def _epoch_seconds(run: Path) -> list[float]:
    """The seconds of each epoch written so far to ``run``'s metrics.csv (a row being written is left out)."""
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        try:
            out.append(float(row["seconds"]))
        except (KeyError, TypeError, ValueError):
            break
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# --------------------------------------------------------------------------------------------------
# Kill and resume (real subprocesses)


def _spawn(argv: list[str], fault: str = "", **popen) -> subprocess.Popen:
    # One intra-op thread: on a busy 2-core machine two OpenMP threads spin against each other (10x slower).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen([sys.executable, "-m", "lvit", *map(str, argv)], env=env, text=True, **popen)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240.0) -> bool:
    """Poll until ``ready()``; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("timed out waiting for the training process")


def _temp_of(folder: Path, name: str) -> list[Path]:
    return list(folder.glob(f".{name}.*.tmp")) if folder.is_dir() else []


def run_files_are_whole(run: Path) -> list[str]:
    """Files of the run folder that are not complete (lvit.core.io's temp files and TensorBoard logs excepted)."""
    broken = []
    for path in run.rglob("*"):
        if path.is_file() and not path.name.endswith(".tmp") and "tensorboard" not in path.parts:
            if not file_is_complete(path):
                broken.append(str(path.relative_to(run)))
    return broken


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_identical_weights(data, tmp_path, tally):
    epochs = 4
    common = ["--data", data, "--epochs", str(epochs), *TINY]
    ref = tmp_path / "uninterrupted"
    done = _spawn(["train", "--out", ref, *common])
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err

    run = tmp_path / "killed"
    ckpt_dir = run / "checkpoints"
    rng = random.Random(8)  # seeded: the same kill moments every time
    plan = [
        # (what, fault injection, trigger: the moment after which a random delay starts, delay range s)
        ("during the first epoch", "", lambda: (run / "config.yaml").is_file(), (0.0, 0.6)),
        ("while writing last.ckpt", "write_delay=1.5:last.ckpt", lambda: bool(_temp_of(ckpt_dir, "last.ckpt")),
         (0.05, 1.0)),
        ("in the middle of an epoch", "", None, (0.05, 0.5)),
    ]
    orphans = 0
    for what, fault, trigger, (lo, hi) in plan:
        resume = (ckpt_dir / "last.ckpt").is_file()
        argv = ["train", "--out", run, *common, "--resume" if resume else "--force"]
        if resume:  # --resume takes its config from the run folder
            argv = ["train", "--out", run, "--resume", "--no-progress"]
        rows_before = len(read_rows(run))
        proc = _spawn(argv, fault)
        if trigger is None:  # mid-epoch: once this process has finished an epoch, kill it in the next one
            trigger = lambda rows_before=rows_before: len(read_rows(run)) > rows_before  # noqa: E731
        assert _wait_for(proc, trigger), f"{what}: the run ended before the kill: {proc.communicate()[1]}"
        time.sleep(rng.uniform(lo, hi))
        assert proc.poll() is None, f"{what}: the run ended before the kill: {proc.communicate()[1]}"
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        tally.add("SIGKILL: injected")
        # Every file is the old complete one or the new complete one; only lvit.core.io temp files may be partial.
        assert run_files_are_whole(run) == [], what
        if (ckpt_dir / "last.ckpt").is_file():
            state = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
            assert state["epoch"] + 1 <= len(read_rows(run)) <= epochs
        orphans += len(list(run.rglob("*.tmp")))
        if "last.ckpt" in what:
            assert _temp_of(ckpt_dir, "last.ckpt"), "the kill was meant to land inside the checkpoint write"

    final = _spawn(["train", "--out", run, "--resume", "--no-progress"])
    out, err = final.communicate(timeout=600)
    assert final.returncode == 0, err
    tally.add("SIGKILL: survived", len(plan))
    assert orphans >= 1  # the kill inside the checkpoint write left a temp file ...
    assert list(run.rglob("*.tmp")) == []  # ... which the resumed run reaped
    assert read_rows(run) == read_rows(ref) and len(read_rows(run)) == epochs
    for name in ("last.safetensors", "best.safetensors"):
        assert_same_weights(ref / "checkpoints" / name, ckpt_dir / name)
    assert "Traceback" not in err


# The synth preset's network (LViT reading MiniLM reports, ViT dropout, report-swapping flips) at toy sizes, with
# DataLoader worker processes: their random streams are what a resume has to reproduce beyond the main process's.
SYNTH_WITH_WORKERS = ["--config", "synth", "--batch-size", "2", "--workers", "2", "--no-progress",
                      "--set", "model.image_size=32", "--set", "model.base_channels=8", "--set", "model.vit_heads=2",
                      "--set", "optim.t0=2"]


@pytest.fixture(scope="module")
def data16(tmp_path_factory) -> Path:
    """16 training images: eight steps an epoch at batch 2, long enough to kill a run inside one."""
    from lvit.data import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("faults16") / "data", n_train=16, n_val=2, n_test=1,
                              size=32, seed=0, progress=False)


@pytest.mark.slow
def test_sigkill_in_epoch_two_of_lvit_with_dataloader_workers_then_resume_is_exact(data16, tmp_path, tally):
    epochs = 3  # the third epoch follows a validation pass of the resumed process: it must not move the streams
    ref = tmp_path / "uninterrupted"
    # In this process, at one thread as the subprocesses (OMP_NUM_THREADS=1; other rounding otherwise): the same
    # `lvit train`, one interpreter start less.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_cli(["train", "--data", data16, "--out", ref, "--epochs", epochs, *SYNTH_WITH_WORKERS])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert len(read_rows(ref)) == epochs
    # The second epoch's time: the first one's also holds the start-up (text encoding, workers), and a kill timed
    # from it can land after the second epoch has ended.
    epoch_seconds = min(float(row["seconds"]) for row in list(csv.DictReader(open(ref / "metrics.csv")))[1:])

    run = tmp_path / "killed"
    last = run / "checkpoints" / "last.ckpt"
    log = open(tmp_path / "killed.log", "w")  # not a pipe: orphaned workers would hold it open after the kill
    proc = _spawn(["train", "--data", data16, "--out", run, "--epochs", epochs, *SYNTH_WITH_WORKERS],
                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    assert _wait_for(proc, lambda: last.is_file() and len(_epoch_seconds(run)) >= 1), \
        f"the run ended before its first checkpoint: {log.name}"
    # Into the second epoch's training steps: 0.3 of the shorter of the reference's epochs and this run's first. When
    # the machine got quieter after the reference run (another job ended), the reference's epoch time alone outlasted
    # this run's remaining epochs.
    time.sleep(0.3 * min(epoch_seconds, *_epoch_seconds(run)))
    assert proc.poll() is None, "the run ended before the kill"
    proc.send_signal(signal.SIGKILL)  # the training process, as `kill -9 PID` does
    proc.wait()
    try:  # its workers notice the dead parent only after seconds: end them now, the test need not wait
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log.close()
    tally.add("SIGKILL: injected")
    assert len(read_rows(run)) == 1 and torch.load(last, weights_only=True)["epoch"] == 0, \
        "the kill was meant to land inside the second epoch"

    resumed = _spawn(["train", "--out", run, "--resume", "--no-progress"])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    tally.add("SIGKILL: survived")
    assert read_rows(run) == read_rows(ref)  # every epoch's train loss, val loss, Dice, IoU and lr
    for name in ("last.safetensors", "best.safetensors"):
        assert_same_weights(ref / "checkpoints" / name, run / "checkpoints" / name)


# --------------------------------------------------------------------------------------------------
# Disk full, read-only folder (in process, through the CLI)


@pytest.fixture(scope="module")
def one_epoch_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    code, _, err = run_cli(["train", "--data", data, "--out", run, "--epochs", "1", *TINY])
    assert code == 0, err
    return run


def _copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    return dest


@pytest.mark.parametrize("fault, culprit, cause", [
    ("enospc=last.ckpt", "last.ckpt", "No space left on device"),
    ("enospc=*.safetensors", "last.safetensors", "No space left on device"),
    ("enospc=metrics.csv", "metrics.csv", "No space left on device"),
    ("eacces=*", "config.yaml", "Permission denied"),  # a read-only run folder (as root: simulated)
])
def test_disk_full_or_read_only_keeps_the_previous_checkpoint(one_epoch_run, tmp_path, monkeypatch, tally,
                                                              fault, culprit, cause):
    run = _copy_run(one_epoch_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    monkeypatch.setenv(FAULT_ENV, fault)
    tally.add("disk full / read-only: injected")
    code, _, err = run_cli(["train", "--out", run, "--resume", "--epochs", "2", "--no-progress"])
    assert_one_line_error(code, err, re.escape(culprit), re.escape(cause))
    monkeypatch.delenv(FAULT_ENV)
    assert (run / "checkpoints/last.ckpt").read_bytes() == before["last.ckpt"]  # the previous state, intact
    assert run_files_are_whole(run) == [] and list(run.rglob("*.tmp")) == []
    # Space freed / folder writable again: the same command carries on from the intact checkpoint.
    code, _, err = run_cli(["train", "--out", run, "--resume", "--epochs", "2", "--no-progress"])
    assert code == 0, err
    assert len(read_rows(run)) == 2
    tally.add("disk full / read-only: survived")


def test_predict_into_a_read_only_folder(one_epoch_run, data, tmp_path, monkeypatch, tally):
    out = tmp_path / "pred"
    tally.add("disk full / read-only: injected")
    if os.geteuid() == 0:
        monkeypatch.setenv(FAULT_ENV, "eacces=*.png")
        expected = "Permission denied"
    else:
        out.mkdir()
        out.chmod(0o555)
        expected = "not writable"
    code, _, err = run_cli(["predict", one_epoch_run, "--images", data / "Test_Folder/img", "--out", out,
                            "--force"])
    if out.exists():
        out.chmod(0o755)
    assert_one_line_error(code, err, re.escape(str(out)), expected)
    assert not out.exists() or list(out.rglob("*.png")) == []  # no mask written, complete or partial
    tally.add("disk full / read-only: survived")


# --------------------------------------------------------------------------------------------------
# Numerics


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(one_epoch_run, tmp_path, monkeypatch,
                                                                          tally):
    from lvit.train.module import SegmentationModule

    run = _copy_run(one_epoch_run, tmp_path / "run")
    before = (run / "checkpoints/last.ckpt").read_bytes()
    original = SegmentationModule.supervised_loss

    def poisoned(self, logits, mask):  # the second epoch's loss turns NaN (as an exploding run would)
        return original(self, logits, mask) * float("nan")

    monkeypatch.setattr(SegmentationModule, "supervised_loss", poisoned)
    tally.add("NaN loss: injected")
    code, _, err = run_cli(["train", "--out", run, "--resume", "--epochs", "2", "--no-progress"])
    assert_one_line_error(code, err, "loss became nan", "last good checkpoint is kept")
    assert (run / "checkpoints/last.ckpt").read_bytes() == before
    from safetensors.torch import load_file

    weights = load_file(str(run / "checkpoints/last.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert len(read_rows(run)) == 1
    tally.add("NaN loss: survived")


def test_exploding_learning_rate_stops_without_writing_nan_weights(data, tmp_path, tally):
    run = tmp_path / "run"
    tally.add("NaN loss: injected")
    code, _, err = run_cli(["train", "--data", data, "--out", run, "--epochs", "2", *TINY, "--lr", "1e30"])
    assert_one_line_error(code, err, r"loss became (nan|inf)")
    for path in run.rglob("*.safetensors"):  # whatever was saved before the blow-up is finite
        from safetensors.torch import load_file

        assert all(torch.isfinite(v).all() for v in load_file(str(path)).values() if v.is_floating_point())
    tally.add("NaN loss: survived")


def test_gradient_clipping_is_honoured(data, tmp_path, monkeypatch):
    """optim.grad_clip clips the global gradient norm before every optimizer step (and only when set)."""
    calls = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = [p for p in parameters if p.grad is not None]
        total = real_clip(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters]))
        calls.append((float(max_norm), float(total), float(after)))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    code, _, err = run_cli(["train", "--data", data, "--out", tmp_path / "clipped", "--epochs", "1", *TINY,
                            "--set", "optim.grad_clip=0.01"])
    assert code == 0, err
    steps = 4  # 8 training images, batch 2
    assert len(calls) == steps and all(max_norm == 0.01 for max_norm, _, _ in calls)
    assert all(total > 0.01 for _, total, _ in calls)  # the gradients really were larger ...
    assert all(after <= 0.01 * 1.001 for _, _, after in calls)  # ... and were clipped to the limit
    calls.clear()
    code, _, err = run_cli(["train", "--data", data, "--out", tmp_path / "free", "--epochs", "1", *TINY])
    assert code == 0, err
    assert calls == []  # off by default
    code, _, err = run_cli(["train", "--data", data, "--out", tmp_path / "bad", *TINY, "--set", "optim.grad_clip=-1"])
    assert_one_line_error(code, err, "grad_clip")
