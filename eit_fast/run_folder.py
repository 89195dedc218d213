"""A training run's folder: its lock, its checkpoints (writing, listing, rotation, the newest readable one,
the one to evaluate), and metrics.jsonl. Every file goes through eit_fast.fileio, so a full disk or a
read-only remount is one WriteError naming the file and the last good checkpoint, which stays loadable.

The lock is an advisory `fcntl.flock` on `run.lock`, held for the life of the run: the kernel drops it when
the process ends, however it ends, so a killed run never leaves a stale lock and a second writer is refused
(or waits: `wait_until_free`).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from pathlib import Path

from .checkpoint import CheckpointError, read_file, save_checked
from .configs import ConfigError
from .fileio import append_line, atomic_write_text

LOCK_NAME = "run.lock"
# What a run writes: a new run refuses a folder holding any of these (resume it, or pick another folder).
_RUN_FILES = ("checkpoint-*.pt", "best.pt", "metrics.jsonl", "final*.safetensors")


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """checkpoint-STEP.pt files, oldest first (temporary files of an interrupted write are not matched)."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint-*.pt")
             if (m := re.fullmatch(r"checkpoint-(\d+)\.pt", p.name))]
    return [p for _, p in sorted(found)]


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = None

    # --- the lock ------------------------------------------------------------------------------------------
    def open(self, new_run: bool):
        """Create the folder if needed, lock it, and clear temporary files of an interrupted write.

        Checked before any data is built, so a bad --output costs nothing."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"argument --output: {p} is a file, not a folder")
        try:
            p.mkdir(parents=True, exist_ok=True)
            fd = os.open(p / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"argument --output: cannot create or write the run folder {p}: "
                              f"{e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(f"{p} is in use by another run (process {holder} holds {p / LOCK_NAME}); wait "
                              f"for it to finish or choose another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock = fd
        if new_run:
            held = sorted(f.name for pattern in _RUN_FILES for f in p.glob(pattern))
            if held:
                self.close()
                raise ConfigError(f"{p} already holds checkpoints of a run ({', '.join(held[:4])}): continue "
                                  f"it with --resume {p}, or choose another --output")
        removed = 0
        for f in p.glob(".*.tmp"):  # left by a run killed mid-write; only a lock holder may remove them
            try:
                f.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as e:  # a read-only folder: the next write fails and says so
                print(f"warning: cannot remove {f}, left by an interrupted write: {e.strerror}", file=sys.stderr)
        if removed:
            print(f"removed {removed} temporary file(s) of an interrupted checkpoint write in {p}",
                  file=sys.stderr)

    def close(self):
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    # --- checkpoints ---------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.path)

    def last_good(self) -> Path | None:
        """The newest checkpoint file, named in write errors as the one that is still intact."""
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def save_checkpoint(self, state: dict, step: int, best: bool, keep_last: int) -> Path:
        """Write checkpoint-STEP.pt (and best.pt first, when `best`), then rotate. The numbered checkpoint is
        written last: a resume takes it, so a failure before it leaves a run that redoes this part."""
        path = self.path / f"checkpoint-{step:08d}.pt"
        last = self.last_good()
        if best:
            save_checked(state, self.path / "best.pt", last_good=last)
        save_checked(state, path, last_good=last)
        self.rotate(keep_last)
        return path

    def rotate(self, keep_last: int):
        """Delete all but the newest keep_last checkpoints. Only ever called right after a checkpoint was
        written, and only finite states are written, so the newest finite checkpoint always survives."""
        for old in self.checkpoints()[:-keep_last]:
            try:
                old.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:  # not fatal: the new checkpoint is written; the old one only takes room
                print(f"warning: cannot remove the old checkpoint {old}: {e.strerror}", file=sys.stderr)

    def newest_readable(self) -> tuple[Path, dict]:
        """The newest checkpoint that reads and verifies, warning about each newer one that does not."""
        ckpts = self.checkpoints()
        if not ckpts:
            started = self.metrics_file.is_file()
            raise CheckpointError(f"--resume {self.path}: the folder holds no checkpoint-*.pt" + (
                " (its run ended before its first checkpoint, so there is nothing to resume: delete the folder "
                "or choose another --output to start again)" if started else ""))
        problems = []
        for path in reversed(ckpts):
            try:
                state = read_file(path)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            for problem in problems:
                print(f"warning: {problem}; resuming from the previous checkpoint, {path.name}",
                      file=sys.stderr, flush=True)
            return path, state
        raise CheckpointError(f"--resume {self.path}: no checkpoint there is readable: " + "; ".join(problems))

    # --- metrics -------------------------------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def append_metrics(self, record: dict):
        last = self.last_good()
        append_line(self.metrics_file, json.dumps(record), what="metrics file",
                    last_good=str(last) if last else None)

    def drop_metrics_after(self, epoch: int):
        """Forget records of epochs after `epoch` (1-based): a resume redoes them, and each is written once."""
        if not self.metrics_file.is_file():
            return
        lines = self.metrics_file.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("epoch", 0) <= epoch:
                    keep.append(line)
            except (ValueError, AttributeError):
                continue  # a line cut short by a crash
        if keep != lines:
            atomic_write_text(self.metrics_file, "".join(f"{x}\n" for x in keep), what="metrics file")


def _holder(fd: int) -> str:
    """The pid a lock file records (written by its holder), or 'unknown'."""
    try:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def wait_until_free(path: str | os.PathLike, announce) -> None:
    """Return once no process holds PATH/run.lock, calling announce(holder pid) first if one does. The wait
    is a blocking flock, which a stop request (a signal handler raising) interrupts."""
    lock = Path(path) / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            announce(_holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)  # releases it again: the run that comes next takes its own


def holder_of(path: str | os.PathLike) -> str | None:
    """The pid holding PATH/run.lock, or None if the folder is free."""
    try:
        fd = os.open(Path(path) / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError:
        return _holder(fd)
    finally:
        os.close(fd)


# --- the checkpoint to evaluate ----------------------------------------------------------------------------

def checkpoint_to_evaluate(folder: str | os.PathLike, ema: bool = False) -> tuple[Path, object, bool, str]:
    """The file `evaluate --checkpoint RUN_DIR` takes: best.pt, else the final export, else the newest
    checkpoint that verifies. Returns (path, its contents, whether to take its EMA weights, why this one);
    a candidate that does not read is skipped with a warning."""
    p = Path(folder)
    final = "final_ema.safetensors" if ema else "final.safetensors"
    candidates = [(p / "best.pt", ema, "the checkpoint of the best validation top-1"),
                  (p / final, False, "the weights at the end of the run (the folder has no best.pt)")]
    candidates += [(c, ema, "the newest readable checkpoint (the run has no best.pt or final export yet)")
                   for c in reversed(list_checkpoints(p))]
    problems = []
    for path, use_ema, why in candidates:
        if not path.is_file():
            continue
        try:
            obj = read_file(path)
        except CheckpointError as e:
            problems.append(str(e))
            print(f"warning: {e}; trying the next candidate", file=sys.stderr, flush=True)
            continue
        best = obj.get("train_state", {}).get("best") if isinstance(obj, dict) else None
        if path.name == "best.pt" and isinstance(best, dict) and "top1" in best:
            why += f" ({best['top1']:.2f}% at epoch {best['epoch']})"
        return path, obj, use_ema, why
    if problems:
        raise CheckpointError(f"{p}: no checkpoint there is readable: " + "; ".join(problems))
    raise CheckpointError(f"{p} is a folder without best.pt, {final} or checkpoint-*.pt: not a run folder of "
                          f"eit_fast.train (pass a checkpoint file instead)")
