"""lvit.core.io: atomic writes leave the old file or the new one, never a mix; failures are one-line errors."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from badinputs import Tally

from lvit.core import io as lio
from lvit.core.errors import LvitError, OutputExistsError


@pytest.fixture(scope="module")
def tally(request):
    t = Tally("atomic writes (lvit.core.io)")
    yield t
    t.report(request)


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(lio.TEMP_SUFFIX))


def test_writers_round_trip_and_leave_no_temp_files(tmp_path):
    lio.atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    lio.atomic_write_text(tmp_path / "sub/b.txt", "héllo\n")  # creates the folder
    lio.atomic_write_json(tmp_path / "c.json", {"x": 1, "p": Path("/p")})
    lio.atomic_save(tmp_path / "d.pt", lambda fh: torch.save({"w": torch.arange(3)}, fh))
    lio.save_png(tmp_path / "e.png", np.full((4, 5), 255, np.uint8))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub/b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "c.json").read_text() == '{\n  "p": "/p",\n  "x": 1\n}\n'
    assert torch.equal(torch.load(tmp_path / "d.pt", weights_only=True)["w"], torch.arange(3))
    from PIL import Image

    with Image.open(tmp_path / "e.png") as im:
        assert im.size == (5, 4) and np.array(im).min() == 255
    assert temp_files(tmp_path) == [] and temp_files(tmp_path / "sub") == []


def test_write_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    lio.atomic_write_text(tmp_path / "f.txt", "x")
    # file fsync, then rename, then the folder's fsync (so the rename itself survives a power cut)
    assert events == ["fsync", "replace", "fsync"]


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    dest = tmp_path / "last.ckpt"
    dest.write_bytes(b"GOOD")

    def half_then_crash(fh):
        fh.write(b"HALF")
        raise RuntimeError("writer bug")

    with pytest.raises(RuntimeError, match="writer bug"):  # a bug stays a bug (not disguised as disk full)
        lio.atomic_save(dest, half_then_crash)
    assert dest.read_bytes() == b"GOOD" and temp_files(tmp_path) == []


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_disk_full_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, where, tally):
    dest = tmp_path / "last.ckpt"
    dest.write_bytes(b"GOOD")
    tally.add(f"ENOSPC in {where} (simulated): injected")

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer = lambda fh: fh.write(b"NEW")  # noqa: E731
    if where == "write":
        writer = lambda fh: enospc()  # noqa: E731
    else:
        monkeypatch.setattr(os, where, enospc)
    with pytest.raises(LvitError) as info:
        lio.atomic_save(dest, writer)
    message = str(info.value)
    assert "\n" not in message and str(dest) in message and "No space left on device" in message
    assert "previous file is unchanged" in message
    monkeypatch.undo()
    assert dest.read_bytes() == b"GOOD" and temp_files(tmp_path) == []
    tally.add(f"ENOSPC in {where} (simulated): survived")


def test_read_only_folder_is_one_line(tmp_path, monkeypatch, tally):
    tally.add("read-only folder: injected")
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "keep.txt").write_text("old")
    if os.geteuid() != 0:
        folder.chmod(0o555)  # a real read-only folder
    else:
        # root ignores permission bits: simulate the EACCES that mkstemp gets in a read-only folder
        monkeypatch.setenv(lio.FAULT_ENV, "eacces=keep.txt")
    try:
        with pytest.raises(LvitError, match=r"keep\.txt: cannot write \(Permission denied\)"):
            lio.atomic_write_text(folder / "keep.txt", "new")
    finally:
        folder.chmod(0o755)
    assert (folder / "keep.txt").read_text() == "old" and temp_files(folder) == []
    tally.add("read-only folder: survived")


def test_library_errors_on_a_full_disk_are_reported_as_disk_full(tmp_path, monkeypatch):
    """torch.save turns ENOSPC into a RuntimeError ('unexpected pos ...'): lvit.core.io looks at the disk itself."""
    dest = tmp_path / "last.ckpt"
    dest.write_bytes(b"GOOD")
    monkeypatch.setattr(lio, "_disk_full", lambda folder: True)

    def torch_like(fh):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    with pytest.raises(LvitError, match="No space left on device"):
        lio.atomic_save(dest, torch_like)
    assert dest.read_bytes() == b"GOOD"


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 256 KiB file system (tmpfs) when this process may mount one (root on Linux); skip otherwise."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); disk full is covered by the simulated tests")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_real_full_disk_with_torch_and_safetensors(tiny_tmpfs, tally):
    tally.add("real full disk (tmpfs), torch + safetensors: injected", 2)
    from safetensors.torch import save_file

    ckpt, weights = tiny_tmpfs / "last.ckpt", tiny_tmpfs / "last.safetensors"
    lio.atomic_save(ckpt, lambda fh: torch.save({"w": torch.zeros(10)}, fh))
    with lio.atomic_path(weights) as tmp:
        save_file({"w": torch.zeros(10)}, str(tmp))
    big = {"w": torch.zeros(200_000)}  # 800 kB: more than the file system holds
    with pytest.raises(LvitError, match="last.ckpt: cannot write .No space left on device"):
        lio.atomic_save(ckpt, lambda fh: torch.save(big, fh))
    with pytest.raises(LvitError, match="last.safetensors: cannot write .No space left on device"):
        with lio.atomic_path(weights) as tmp:
            save_file(big, str(tmp))
    assert torch.load(ckpt, weights_only=True)["w"].shape == (10,)  # the old files, intact
    from safetensors.torch import load_file

    assert load_file(str(weights))["w"].shape == (10,)
    assert temp_files(tiny_tmpfs) == []
    tally.add("real full disk (tmpfs), torch + safetensors: survived", 2)


_SLOW_WRITER = """
import sys
from lvit.core.io import atomic_write_bytes
atomic_write_bytes(sys.argv[1], b"NEW" * 1000)
"""


def test_sigkill_mid_write_leaves_old_file_and_next_write_reaps_the_temp(tmp_path, tally):
    tally.add("SIGKILL mid-write: injected")
    dest = tmp_path / "last.ckpt"
    dest.write_bytes(b"GOOD")
    env = {**os.environ, lio.FAULT_ENV: "write_delay=30:last.ckpt"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(dest)], env=env)
    deadline = time.monotonic() + 60
    while not temp_files(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)  # temp written, now sleeping before the rename
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert dest.read_bytes() == b"GOOD"  # the interrupted write never replaced the good file
    orphans = temp_files(tmp_path)
    assert len(orphans) == 1 and f".{proc.pid}." in orphans[0]
    assert lio.stale_temp_files(dest) == [tmp_path / orphans[0]]
    lio.atomic_write_bytes(dest, b"NEXT")  # the next write removes the dead writer's temporary file
    assert dest.read_bytes() == b"NEXT" and temp_files(tmp_path) == []
    tally.add("SIGKILL mid-write: survived")


def test_temp_files_of_live_writers_are_never_reaped(tmp_path):
    dest = tmp_path / "x.bin"
    live = tmp_path / f"{lio._temp_prefix(dest, pid=os.getppid())}abc{lio.TEMP_SUFFIX}"
    other_host = tmp_path / f".x.bin.elsewhere.999999.abc{lio.TEMP_SUFFIX}"
    live.write_bytes(b"in progress")
    other_host.write_bytes(b"in progress")
    lio.atomic_write_bytes(dest, b"data")
    assert live.exists() and other_host.exists()


def test_fault_spec_parsing(monkeypatch):
    monkeypatch.setenv(lio.FAULT_ENV, "write_delay=0.25:*.ckpt; enospc=metrics.csv ;eacces=")
    assert lio._faults("write_delay", "last.ckpt") == ["0.25"]
    assert lio._faults("write_delay", "last.safetensors") == []
    assert lio._faults("enospc", "metrics.csv") == [""] and lio._faults("enospc", "x.csv") == []
    assert lio._faults("eacces", "anything") == [""]  # empty glob: every file
    monkeypatch.delenv(lio.FAULT_ENV)
    assert lio._faults("enospc", "metrics.csv") == []


def test_prepare_output_dir_and_refuse_clobber(tmp_path):
    out = lio.prepare_output_dir(tmp_path / "new/deep")
    assert out.is_dir()
    (out / "old.png").write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="not empty; pass --force"):
        lio.prepare_output_dir(out)
    assert lio.prepare_output_dir(out, force=True) == out and (out / "old.png").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        lio.prepare_output_dir(tmp_path / "file")
    with pytest.raises(OutputExistsError, match="--force"):
        lio.refuse_clobber(tmp_path / "file", force=False)
    assert lio.refuse_clobber(tmp_path / "file", force=True) == tmp_path / "file"
    with pytest.raises(LvitError, match="cannot create"):
        lio.prepare_output_dir(tmp_path / "file" / "below")


def _write_entries(path: str, prefix: str, n: int, start) -> None:
    start.wait()  # both writers begin together, so their read-modify-writes interleave
    for i in range(n):
        lio.update_results_file(path, f"{prefix}{i}", {"dice": np.float32(0.5), "curve": np.arange(2)})


def test_results_file_updates_from_processes_side_by_side_keep_every_entry(tmp_path):
    import multiprocessing

    path = tmp_path / "bench" / "results.json"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    workers = [ctx.Process(target=_write_entries, args=(str(path), p, 25, start)) for p in ("a", "b")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    results = lio.read_results_file(path)
    assert sorted(results) == sorted(f"{p}{i}" for p in "ab" for i in range(25))
    assert results["a0"] == {"dice": 0.5, "curve": [0, 1]}  # NumPy values written as plain JSON
    path.write_text("{not json")
    with pytest.raises(LvitError, match="results.json: unreadable results file"):
        lio.update_results_file(path, "c", {})
    assert path.read_text() == "{not json"  # a damaged file is left as it was
