"""Atomic file output: a half-written file never replaces a good one.

Every writer here writes to a temporary file in the destination folder, flushes and fsyncs it, then
renames it over the destination (``os.replace`` is atomic on POSIX) and fsyncs the folder. A crash or a
full disk at any moment leaves either the old file or the new one, never a truncated mix.

Temporary files are named ``.<name>.<host>.<pid>.<random>.tmp``. A process killed mid-write (SIGKILL, OOM
killer, power loss) leaves its temporary file behind; the next write of the same destination from the same
host removes those whose process is gone (never those of a live writer, nor of another host on a shared file
system).

Write failures become one-line :class:`~lvit.core.errors.LvitError` messages naming the file and the cause ("No space
left on device", "Permission denied", "Read-only file system"), also when the library doing the writing
(torch, safetensors) hides the ``OSError`` behind its own exception type.

Fault injection (for tests and drills; read at each write, no cost when unset): ``LVIT_FAULT_INJECT`` holds
``;``-separated items, each ``KIND=GLOB`` or ``KIND=SECONDS:GLOB`` matched against the destination's file name:

* ``write_delay=SECONDS:GLOB``: sleep after the temporary file is written, before it is synced and renamed
  (widens the window in which a kill interrupts a write);
* ``enospc=GLOB``: fail as a full disk would, after the temporary file is written;
* ``eacces=GLOB``: fail as a read-only folder would, when the temporary file is created.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import io
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, LvitError, OutputExistsError

FAULT_ENV = "LVIT_FAULT_INJECT"
TEMP_SUFFIX = ".tmp"
# Below this much free space, a failed write is reported as a full disk whatever exception the writer raised.
_DISK_FULL_BYTES = 1 << 20


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


# --------------------------------------------------------------------------------------------------
# Fault injection (LVIT_FAULT_INJECT)


def _faults(kind: str, name: str) -> list[str]:
    """Values of the ``kind`` items of LVIT_FAULT_INJECT whose glob matches the file name ``name``."""
    spec = os.environ.get(FAULT_ENV, "")
    values = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        key, _, value = item.partition("=")
        if key.strip() != kind:
            continue
        arg, _, pattern = value.rpartition(":") if ":" in value else ("", "", value)
        if fnmatch.fnmatch(name, pattern.strip() or "*"):
            values.append(arg.strip())
    return values


def _inject_after_write(dest: Path) -> None:
    for seconds in _faults("write_delay", dest.name):
        time.sleep(float(seconds or 1.0))
    if _faults("enospc", dest.name):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))


def _inject_on_create(dest: Path) -> None:
    if _faults("eacces", dest.name):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dest.parent))


# --------------------------------------------------------------------------------------------------
# Temporary files


def _host_tag() -> str:
    return "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())[:32] or "host"


def _temp_prefix(dest: Path, pid: int | None = None) -> str:
    return f".{dest.name}.{_host_tag()}.{os.getpid() if pid is None else pid}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def stale_temp_files(dest: str | Path) -> list[Path]:
    """Temporary files of ``dest`` left by killed writers on this host (their process no longer exists)."""
    dest = Path(dest)
    head = f".{dest.name}.{_host_tag()}."
    stale = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(dest.parent):
            if not (entry.name.startswith(head) and entry.name.endswith(TEMP_SUFFIX)):
                continue
            pid_text = entry.name[len(head):].split(".", 1)[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
                stale.append(Path(entry.path))
    return stale


def _reap_stale_temps(dest: Path) -> None:
    for path in stale_temp_files(dest):
        with contextlib.suppress(OSError):
            path.unlink()


def _disk_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < _DISK_FULL_BYTES


def _write_error(dest: Path, exc: BaseException) -> LvitError:
    cause = (exc.strerror if isinstance(exc, OSError) and exc.strerror
             else str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return LvitError(f"{dest}: cannot write ({cause}); the previous file is unchanged")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is fsynced and renamed onto ``dest``.

    Use for libraries that insist on writing to a path themselves (safetensors, matplotlib, ONNX).
    On any failure the temporary file is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _inject_on_create(dest)
        _reap_stale_temps(dest)
        fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=TEMP_SUFFIX, dir=dest.parent)
        os.close(fd)
    except OSError as exc:
        raise LvitError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        _inject_after_write(dest)
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the result the permissions an ordinary open() would (0666 & ~umask).
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:
        raise _write_error(dest, exc) from exc
    except LvitError:
        raise
    except Exception as exc:
        # torch.save and safetensors turn ENOSPC into RuntimeError / SafetensorError: check the disk itself
        # (before the temporary file is removed) so a full disk still reads as one line, not a traceback.
        if _disk_full(dest.parent) or "No space left" in str(exc) or "os error 28" in str(exc):
            raise LvitError(f"{dest}: cannot write ({os.strerror(errno.ENOSPC)}); "
                            "the previous file is unchanged") from exc
        raise
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


def atomic_write_csv(dest: str | Path, rows: list[dict], columns: list[str]) -> Path:
    """A table of ``rows`` (dicts keyed by ``columns``) as CSV, floats written to 6 significant digits."""
    import csv

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return atomic_write_text(dest, buf.getvalue())


def write_marked_section(path: str | Path, name: str, body: str) -> Path:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in the markdown file ``path``:
    replaces that block where it exists, else appends it; the rest of the file is kept. Atomic. The benchmark
    scripts each own one such section of bench/RESULTS.md."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# lvit benchmark results\n"
    head, found, rest = text.partition(start)
    if found and end in rest:
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    return atomic_write_text(path, text)


def read_results_file(path: str | Path) -> dict:
    """A benchmark's results JSON (a JSON object; {} when the file does not exist). A damaged file is a one-line
    LvitError naming it, never a traceback."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LvitError(f"{path}: unreadable results file ({exc})") from None
    if not isinstance(results, dict):
        raise LvitError(f"{path}: not a results file (expected a JSON object)")
    return results


def update_results_file(path: str | Path, key: str, entry: Any) -> dict:
    """Set ``results[key] = entry`` in a benchmark's results JSON and return the whole object.

    Re-reads the file under an exclusive lock first, so processes evaluating side by side keep each other's
    entries. NumPy and torch numbers and arrays are written as plain JSON. The ``.lock`` file beside it stays:
    removing it would let a waiting writer and a new one each hold "the" lock."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = read_results_file(path)
        results[key] = entry
        atomic_write_text(path, json.dumps(results, indent=1, sort_keys=True, default=_plain_number) + "\n")
    return results


def _plain_number(value: Any) -> Any:
    if hasattr(value, "tolist"):  # NumPy or torch scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


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
    return save_image(dest, array, "PNG")


# Image files lvit writes for the user: the format is the one the file's extension names.
IMAGE_FORMATS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".jpg": "JPEG", ".jpeg": "JPEG"}
LOSSLESS_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


def image_format(path: str | Path, lossless: bool = True, flag: str | None = None) -> str:
    """The Pillow format named by ``path``'s extension; ConfigError when there is none or it does not fit.

    ``lossless=True`` (masks, probability maps) refuses JPEG: it would blur the 0/255 values of a mask.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    where = f"{flag} {path}" if flag else str(path)
    allowed = LOSSLESS_SUFFIXES if lossless else tuple(IMAGE_FORMATS)
    if suffix in allowed:
        return IMAGE_FORMATS[suffix]
    if suffix in IMAGE_FORMATS:
        raise ConfigError(f"{where}: JPEG is lossy and would blur the mask's values; use .png, .tif or .bmp")
    known = ", ".join(dict.fromkeys(allowed))
    if not path.suffix:
        raise ConfigError(f"{where}: no file extension to name the image format; use {known}")
    raise ConfigError(f"{where}: '{path.suffix}' is not an image format lvit writes; use {known}")


def save_image(dest: str | Path, array, format: str | None = None) -> Path:
    """Save a uint8 HxW or HxWxC numpy array, atomically, in ``format`` (default: the one ``dest``'s
    extension names, see :func:`image_format`)."""
    from PIL import Image

    fmt = format or image_format(dest, lossless=False)
    buf = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "JPEG":
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(buf, format=fmt, quality=95)
    else:
        image.save(buf, format=fmt)
    return atomic_write_bytes(dest, buf.getvalue())


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when the two paths name the same file (or would: both resolved to one path)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_writable(path: str | Path, what: str = "output") -> Path:
    """Raise (one line) when ``path`` could not be created: its nearest existing folder is a file or is not
    writable. Cheap; run it before slow work so a bad output path fails first."""
    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LvitError(f"{path}: cannot write {what} ({parent} is a file, not a folder)")
    if not os.access(parent, os.W_OK):
        raise LvitError(f"{path}: cannot write {what} ({parent} is not writable)")
    return path


def prepare_output_dir(path: str | Path, force: bool = False, what: str = "output folder",
                       ignore: tuple[str, ...] = ()) -> Path:
    """Create ``path``; refuse a non-empty existing folder unless ``force`` (then keep its files). Entries named in
    ``ignore`` (the caller's own lock) do not make it non-empty."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path}: exists and is not a folder")
    if path.is_dir() and any(p.name not in ignore for p in path.iterdir()) and not force:
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
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a folder; give the name of the file to write")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: exists; pass --force to overwrite it")
    return path


def _missing_ancestors(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty_tree(folder: str | Path) -> None:
    """Remove the empty folders below ``folder``, then ``folder`` itself if it is left empty (best effort)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()


@contextlib.contextmanager
def output_dir(path: str | Path, force: bool = False, what: str = "output folder") -> Iterator[Path]:
    """:func:`prepare_output_dir` for a block of work that may fail: when it does, the folders this call
    created are removed again if nothing was written into them (never an empty output folder left behind;
    folders that existed before are left alone)."""
    path = Path(path)
    created = _missing_ancestors(path)
    out = prepare_output_dir(path, force, what)
    try:
        yield out
    except BaseException:
        if created:
            remove_empty_tree(out)
            for parent in created[1:]:
                with contextlib.suppress(OSError):
                    parent.rmdir()
        raise
