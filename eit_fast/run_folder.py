"""A training run's folder: its lock, its checkpoints (listing, rotation, the newest readable one), and
metrics.jsonl.

The lock is an advisory `fcntl.flock` on `run.lock`, held for the life of the run: the kernel drops it when
the process ends, however it ends, so a killed run never leaves a stale lock and a second writer is refused.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from pathlib import Path

from .checkpoint import CheckpointError, atomic_save, read_file
from .configs import ConfigError

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
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
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
        stale = list(p.glob(".*.tmp"))
        for f in stale:  # left by a run killed mid-write; only a lock holder may remove them
            f.unlink(missing_ok=True)
        if stale:
            print(f"removed {len(stale)} temporary file(s) of an interrupted checkpoint write in {p}",
                  file=sys.stderr)

    def close(self):
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    # --- checkpoints ---------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.path)

    def rotate(self, keep_last: int):
        """Delete all but the newest keep_last checkpoints. Only ever called right after a checkpoint was
        written, and only finite states are written, so the newest finite checkpoint always survives."""
        for old in self.checkpoints()[:-keep_last]:
            old.unlink()

    def newest_readable(self) -> tuple[Path, dict]:
        """The newest checkpoint that reads and verifies, warning about each newer one that does not."""
        ckpts = self.checkpoints()
        if not ckpts:
            raise CheckpointError(f"--resume {self.path}: the folder holds no checkpoint-*.pt")
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
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")

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
            atomic_save(lambda tmp: Path(tmp).write_text("".join(f"{x}\n" for x in keep)), self.metrics_file)
