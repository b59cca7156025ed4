"""Atomic file output: a half-written file never replaces a good one.

Every writer here writes to a temporary file in the destination folder, flushes and fsyncs it, then
renames it over the destination (``os.replace`` is atomic on POSIX) and fsyncs the folder. A crash or a
full disk at any moment leaves either the old file or the new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import LvitError, OutputExistsError


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is fsynced and renamed onto ``dest``.

    Use for libraries that insist on writing to a path themselves (safetensors, matplotlib, ONNX).
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
    except OSError as exc:
        raise LvitError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:
        raise LvitError(f"{dest}: cannot write ({exc.strerror or exc}); the previous file is unchanged") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(dest: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``dest`` atomically and return ``dest``."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return dest


def atomic_write_text(dest: str | Path, text: str) -> Path:
    return atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest: str | Path, obj: Any) -> Path:
    return atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save(dest: str | Path, writer: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``writer(file_object)`` on a temporary file, then move it onto ``dest`` atomically."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            writer(fh)
    return dest


def save_png(dest: str | Path, array) -> Path:
    """Save a uint8 HxW or HxWxC numpy array as PNG, atomically."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return atomic_write_bytes(dest, buf.getvalue())


def prepare_output_dir(path: str | Path, force: bool = False, what: str = "output folder") -> Path:
    """Create ``path``; refuse a non-empty existing folder unless ``force`` (then keep its files)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExistsError(f"{path}: {what} exists and is not empty; pass --force to write into it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LvitError(f"{path}: cannot create {what} ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK):
        raise LvitError(f"{path}: {what} is not writable")
    return path


def refuse_clobber(path: str | Path, force: bool) -> Path:
    """Raise if the file ``path`` exists and ``force`` is false."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: exists; pass --force to overwrite it")
    return path
