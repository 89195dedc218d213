"""Writing files so that a machine fault loses nothing: the one helper every file eit_fast writes goes through.

`atomic_write(path, write)` has `write(tmp)` fill a temporary file beside `path`, fsyncs it and renames it over
`path`, so a crash or a full disk never leaves a partial file there (the previous version survives). An
OSError on the way (no space, quota, I/O error, read-only file system, ...), or the same failure reported
by torch.save or safetensors in their own words, becomes one `WriteError` whose message names the file, the
cause in words (with the free space and the size needed where known) and, where the caller says, the last
good file that is still intact. Command-line entry points print it as one `error:` line and exit with code 2.

`append_line` adds one record to a log (metrics.jsonl) so that readers never meet half a record.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import traceback
import threading
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["WriteError", "atomic_write", "atomic_write_text", "atomic_write_json", "append_line", "explain",
           "write_error", "abandon_writes"]

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
# How torch.save (its zip writer) and safetensors report a failed write when they keep no errno.
_ERRNO_IN_TEXT = re.compile(r"\((?:os error|errno) (\d+)\)|\[Errno (\d+)\]", re.IGNORECASE)
_WRITE_FAILURE_TEXT = re.compile(r"unexpected pos|file write failed|failed writing|iostream error|i/o error",
                                 re.IGNORECASE)

# Temporary files of the writes under way (temporary -> target), so that a process ending at once (a second
# stop signal: os._exit skips every `finally`) can remove them first.
_in_progress: dict[str, Path] = {}
_in_progress_lock = threading.Lock()


class WriteError(OSError):
    """A file could not be written; `str(e)` is one line for the user. Subclasses OSError, so callers that
    already handle OSError keep working; `.path`, `.errno` and `.last_good` say what failed."""

    def __init__(self, message: str, path: Path, err: Optional[int], last_good: Optional[str] = None):
        super().__init__(err, message)
        self.message, self.path, self.last_good = message, path, last_good

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable (OSError's own reduce would call __init__ with its two args)
        return type(self), (self.message, self.path, self.errno, self.last_good)


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
    """The errno behind an exception, following its causes, also when a library kept it only in its message
    (safetensors: '... (os error 28)')."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        m = _ERRNO_IN_TEXT.search(str(e))
        if m:
            return int(m.group(1) or m.group(2))
        e = e.__cause__ or e.__context__
    return None


def _is_write_failure(e: BaseException) -> bool:
    """Whether an exception from a writer is the file system failing (not a bug or bad data)."""
    if isinstance(e, OSError) or explain(e) is not None:
        return True
    while e is not None:
        if _WRITE_FAILURE_TEXT.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def write_error(path: str | os.PathLike, e: BaseException, what: str = "file", size_hint: Optional[int] = None,
                last_good: Optional[str] = None, left_behind: Optional[str] = None) -> WriteError:
    """The WriteError for a failed write of `path` (for writers that cannot go through atomic_write)."""
    path = Path(path)
    err = explain(e)
    free = _free_bytes(path.parent)
    if err is None and "unexpected pos" in str(e) and free is not None and (size_hint is None
                                                                            or free < size_hint + 2**20):
        err = errno.ENOSPC  # torch.save's zip writer: a short write on a full disk
    cause = _CAUSES.get(err) if err is not None else None
    if cause is None:
        cause = f"{type(e).__name__}: {e}" if err is None else f"{os.strerror(err)} (errno {err})"
    if err in (errno.ENOSPC, errno.EDQUOT) and free is not None:
        cause += f" ({_mib(free)} free" + (f", {_mib(size_hint)} needed" if size_hint else "") + ")"
    msg = f"could not write the {what} {path}: {cause}"
    if last_good:
        msg += f"; the last good one, {last_good}, is intact"
    msg += f"; {left_behind}" if left_behind else "; nothing half-written was left behind"
    return WriteError(msg, path, err, str(last_good) if last_good else None)


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


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # not thread-safe, hence only where /proc is missing
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The permissions a plain open() would give (mkstemp's are 0600), or the replaced file's own."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _prepare_folder(path: Path):
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a part of the path is a file
        raise NotADirectoryError(errno.ENOTDIR, "a part of the path is a file", str(path.parent)) from e


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], what: str = "file",
                 size_hint: Optional[int] = None, last_good: Optional[str] = None) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it and rename it over `path`.

    Raises WriteError (one line: the file, the cause, `last_good` if given) on any OSError, and on the errors
    torch.save and safetensors raise for a failed write; other exceptions (bugs, bad data) pass unchanged.
    The temporary file is always removed, also on KeyboardInterrupt or a stop request.
    size_hint: bytes the file will take, for the 'needed' figure of a full-disk message.
    """
    path = Path(path)
    tmp = None
    try:
        _prepare_folder(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        with _in_progress_lock:
            _in_progress[tmp] = path
        write(tmp)
        os.chmod(tmp, _mode_for(path))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with _in_progress_lock:
            _in_progress.pop(tmp, None)
        tmp = None
    except Exception as e:
        if isinstance(e, WriteError) or not _is_write_failure(e):
            raise
        # The writer's frames still hold its open file (torch.save's zip writer): drop them, so the removed
        # temporary file gives its space back before the free space is measured for the message.
        chained = e
        while chained is not None:
            traceback.clear_frames(chained.__traceback__)
            chained = chained.__cause__ or chained.__context__
        left = _remove(tmp)
        tmp = None
        raise write_error(path, e, what, size_hint, last_good, left) from e
    finally:
        _remove(tmp)
    _fsync_dir(path.parent)


def _remove(tmp: Optional[str]) -> Optional[str]:
    """Remove a temporary file; None if it is gone, else what was left behind (for the message)."""
    if tmp is None:
        return None
    with _in_progress_lock:
        _in_progress.pop(tmp, None)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    except OSError as e:
        return f"its temporary file {tmp} could not be removed ({e.strerror})"
    return None


def abandon_writes() -> list[Path]:
    """Remove the temporary files of the writes under way and return their targets (whose previous versions
    are intact): for a process that must end at once."""
    with _in_progress_lock:
        items = list(_in_progress.items())
        _in_progress.clear()
    for tmp, _ in items:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return [target for _, target in items]


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file", last_good: Optional[str] = None):
    data = text.encode()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), what, len(data), last_good)


def atomic_write_json(path: str | os.PathLike, obj: Any, what: str = "file", last_good: Optional[str] = None):
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n", what, last_good)


def append_line(path: str | os.PathLike, line: str, what: str = "file", last_good: Optional[str] = None) -> None:
    """Append one line (a JSON record) and flush it to disk. A failed append leaves the file as it was: the
    partial line is cut off again, so readers never meet half a record. A file whose last line was cut short
    (by a crash) gets the new record on a line of its own."""
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    try:
        _prepare_folder(path)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise write_error(path, e, what, len(data), last_good) from e
    start = None
    try:
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:  # unbuffered: a short write is seen here, not in a later flush
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException as e:  # also a stop request between two writes: never leave half a record
        left = None
        if start is not None:
            try:
                os.ftruncate(fd, start)
            except OSError as e2:
                left = f"a partial line may remain at its end ({e2.strerror})"
        if not isinstance(e, OSError):
            raise
        raise write_error(path, e, what, len(data), last_good, left) from e
    finally:
        os.close(fd)
