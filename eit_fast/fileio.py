"""Writing files so that a machine fault loses nothing: the one helper every file eit_fast writes goes through.

`atomic_write(path, write)` has `write(tmp)` fill a temporary file beside `path`, fsyncs it and renames it over
`path`, so a crash or a full disk never leaves a partial file there (the previous version survives). An
OSError on the way (no space, quota, I/O error, read-only file system, ...) becomes one `WriteError` whose
message names the file, the cause in words (with the free space and the size needed where known) and,
where the caller says, the last good file that is still intact. Command-line entry points print it as one
`error:` line and exit with code 2.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["WriteError", "atomic_write", "atomic_write_text", "atomic_write_json", "append_line", "explain"]

_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EIO: "an I/O error (the disk or the network file system failed)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.EFBIG: "the file is too large for this file system",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "the path is a folder",
}


class WriteError(OSError):
    """A file could not be written; `str(e)` is one line for the user. Subclasses OSError, so callers that
    already handle OSError keep working; `.path`, `.errno` and `.last_good` say what failed."""

    def __init__(self, message: str, path: Path, err: Optional[int], last_good: Optional[str] = None):
        super().__init__(err, message)
        self.message, self.path, self.last_good = message, path, last_good

    def __str__(self) -> str:
        return self.message


def _free_bytes(folder: Path) -> Optional[int]:
    for p in (folder, *folder.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def explain(e: BaseException) -> Optional[int]:
    """The errno behind an exception, also when torch.save wraps it in a RuntimeError (its zip writer
    reports a short write as 'unexpected pos ...' and keeps no errno)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        e = e.__cause__ or e.__context__
    return None


def _error(path: Path, e: BaseException, what: str, size: Optional[int], last_good: Optional[str]) -> WriteError:
    err = explain(e)
    free = _free_bytes(path.parent)
    if err is None and isinstance(e, RuntimeError) and "unexpected pos" in str(e) and free is not None \
            and (size is None or free < size + 2**20):
        err = errno.ENOSPC  # torch.save's zip writer: a short write on a full disk
    cause = _CAUSES.get(err) if err is not None else None
    if cause is None:
        cause = f"{type(e).__name__}: {e}" if err is None else f"{os.strerror(err)} (errno {err})"
    if err in (errno.ENOSPC, errno.EDQUOT) and free is not None:
        cause += f" ({_mib(free)} free" + (f", {_mib(size)} needed" if size else "") + ")"
    msg = f"could not write the {what} {path}: {cause}"
    if last_good:
        msg += f"; the last good one, {last_good}, is intact"
    msg += "; nothing half-written was left behind"
    return WriteError(msg, path, err, last_good)


def _fsync_dir(folder: Path):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename itself is atomic
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], what: str = "file",
                 size_hint: Optional[int] = None, last_good: Optional[str] = None) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it and rename it over `path`.

    Raises WriteError (one line: the file, the cause, `last_good` if given) on any OSError, and also on the
    RuntimeError that torch.save raises for a short write; the temporary file is always removed.
    size_hint: bytes the file will take, for the 'needed' figure of a full-disk message.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as e:
        if isinstance(e, WriteError):
            raise
        if isinstance(e, RuntimeError) and explain(e) is None and "unexpected pos" not in str(e) \
                and "write" not in str(e).lower():
            raise  # not a write failure: a bug or bad data, keep the traceback
        raise _error(path, e, what, size_hint, last_good) from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file", last_good: Optional[str] = None):
    data = text.encode()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), what, len(data), last_good)


def atomic_write_json(path: str | os.PathLike, obj: Any, what: str = "file", last_good: Optional[str] = None):
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n", what, last_good)


def append_line(path: str | os.PathLike, line: str, what: str = "file") -> None:
    """Append one line (a JSON record) and flush it to disk. A failed append leaves the file as it was: the
    partial line is cut off again, so readers never meet half a record."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    try:
        with open(path, "ab") as f:
            start = f.tell()
            try:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                try:
                    f.truncate(start)
                except OSError:
                    pass
                raise
    except OSError as e:
        raise _error(path, e, what, len(data), None) from e
