"""Stop requests: what SIGTERM, SIGINT and SIGUSR1 do to a process of eit_fast.

Schedulers (SLURM, Kubernetes, torchrun) send SIGTERM and, about 30 s later, SIGKILL; SLURM's `--signal`
sends SIGUSR1 a while before a pre-emption. So:
- The first SIGTERM or SIGINT is a stop request. While `raising` (set-up: reading a checkpoint, decoding the
  data, building a cache; the whole of an evaluation or analysis command) there is nothing to save: the
  main thread's handler raises `Stopped`, which unwinds (removing any half-written file) to the entry point.
  Otherwise (a training run) it is only recorded: the run stops at its next safe point (`SafePoints.poll`,
  after each training step and each evaluation batch), saves a checkpoint and exits with 128 + the signal.
- A second one ends the process at once, saying what was not saved. The same signal arriving twice within
  DUPLICATE_WINDOW_S counts once (a terminal's Ctrl-C reaches every process of its group, and a wrapper
  may forward it too).
- SIGUSR1 asks for a checkpoint at the next safe point; the run goes on.

The signals are read by a watcher thread through `signal.set_wakeup_fd`, so they are seen, and a second one
acts, even while the main thread is blocked in a long C++ call (a collective waiting on another rank, a GPU
kernel, a large torch.load). The same thread stops a run whose parent process is gone when the parent asked
for that through PARENT_ENV (the experiment runner does; Linux's PR_SET_PDEATHSIG is the first line).
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from . import distributed, fileio

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAVE_SIGNAL = signal.SIGUSR1
DUPLICATE_WINDOW_S = 1.0
PARENT_ENV = "EIT_FAST_STOP_WITH_PARENT"  # a pid: stop as on SIGTERM when this process is no longer the parent
PARENT_CHECK_S = 1.0


class Stopped(BaseException):
    """A stop request where there is nothing to save. A BaseException, so `except Exception` clean-up code
    (a cache reader that ignores any failure, say) lets it through."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"signal {self.signum} ({signal_name(self.signum)})"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _say(text: str):
    # os.write, not print: the watcher thread must never wait on a lock the blocked main thread holds.
    try:
        os.write(2, (text + "\n").encode(errors="replace"))
    except OSError:
        pass


class Requests:
    """The stop and save requests of this process (see the module's docstring)."""

    def __init__(self, raising: bool = True, installed: bool = True):
        self.stop = 0          # signal number of the first stop request, 0 for none
        self.save = False      # a SIGUSR1 not yet served
        self.raising = raising
        self.installed = installed
        self.quiet = False     # a rank other than 0: only the immediate exit speaks
        self.unsaved: Callable[[], str] = lambda: "nothing (no training state yet)"
        self._first_at = 0.0
        self._lock = threading.Lock()
        self._owner = os.getpid()
        self._parent = _parent_to_watch()
        self._parent_gone = False
        self._raised = False
        self._closing = False

    # --- what the signals do (the watcher thread is the one judge of counts and times) ---------------------
    def _on_signal(self, signum: int):
        with self._lock:
            now = time.monotonic()
            if signum == SAVE_SIGNAL:
                self.save = True
                if not self.quiet:
                    _say(f"received signal {signum} (SIGUSR1): saving a checkpoint at the next safe point, "
                         f"then going on")
                return
            if not self.stop:
                self.stop, self._first_at = signum, now
                if not self.quiet and not self.raising:  # when raising, the entry point reports the stop
                    _say(f"\nreceived signal {signum} ({signal_name(signum)}): stopping at the next safe point "
                         f"with a checkpoint (a second signal stops at once, without saving)")
                return
            if now - self._first_at < DUPLICATE_WINDOW_S:
                return  # the same request delivered twice
        self._exit_now(signum)

    def _exit_now(self, signum: int):
        try:
            lost = self.unsaved()
        except Exception as e:  # describing the loss must not stop the exit
            lost = f"unknown ({type(e).__name__})"
        targets = fileio.abandon_writes()
        msg = f"received signal {signum} ({signal_name(signum)}) again: stopping now without saving; not saved: " \
              f"{lost}"
        if targets:
            msg += "; the unfinished write of " + ", ".join(map(str, targets)) + " was removed (the previous " \
                   "version, if any, is intact)"
        rank = os.environ.get("RANK")
        _say((f"rank {rank}: " if self.quiet and rank else "") + msg)
        os._exit(128 + signum)

    def _handler(self, signum, frame):
        if os.getpid() != self._owner:  # a forked DataLoader worker: the process that owns the run acts
            return
        if self.raising and signum in STOP_SIGNALS and not self._raised:
            self._raised = True  # once: a second Stopped would break into the first one's clean-up
            raise Stopped(signum)

    # --- installing ---------------------------------------------------------------------------------------
    def _install(self):
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        self._old_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old_handlers = {s: signal.signal(s, self._handler) for s in (*STOP_SIGNALS, SAVE_SIGNAL)}
        self._thread = threading.Thread(target=self._watch, name="eit_fast-stop", daemon=True)
        self._thread.start()
        if self._parent is not None and os.getppid() != self._parent:
            self._on_parent_gone()

    def _uninstall(self):
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(self._old_wakeup)
        self._closing = True
        try:
            os.write(self._w, b"\0")  # wakes the watcher, which then ends
        except OSError:
            pass
        self._thread.join(timeout=5)
        os.close(self._r)
        os.close(self._w)

    def _watch(self):
        timeout = PARENT_CHECK_S if self._parent is not None else None
        while not self._closing:
            ready, _, _ = select.select([self._r], [], [], timeout)
            if self._closing:
                return
            if not ready:
                if not self._parent_gone and os.getppid() != self._parent:
                    self._on_parent_gone()
                continue
            for signum in os.read(self._r, 256):
                if signum in STOP_SIGNALS or signum == SAVE_SIGNAL:
                    self._on_signal(signum)

    def _on_parent_gone(self):
        self._parent_gone = True
        if not self.quiet:
            _say(f"the process that started this one (pid {self._parent}) is gone: stopping as on SIGTERM")
        os.kill(os.getpid(), signal.SIGTERM)  # through the handler, so that a set-up stops at once too


def _parent_to_watch() -> Optional[int]:
    """The parent this process must not outlive: the one PARENT_ENV names, or torchrun's agent (a worker
    whose agent is gone has no one left to stop it or to notice its failure)."""
    value = os.environ.get(PARENT_ENV, "")
    if value.isdigit():
        return int(value)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return os.getppid()
    return None


_active: Optional[Requests] = None


def current() -> Optional[Requests]:
    """The installed requests of this process, or None."""
    return _active


@contextlib.contextmanager
def handling(raising: bool = True) -> Iterator[Requests]:
    """Handle the stop signals for the duration (see the module's docstring). Re-entrant: an inner use only
    switches `raising`, and puts it back when it ends. Outside the main thread (where Python gives no
    signals) it yields requests that never come."""
    global _active
    if _active is not None:
        previous = _active.raising
        _active.raising = raising
        try:
            yield _active
        finally:
            _active.raising = previous
        return
    if threading.current_thread() is not threading.main_thread():
        yield Requests(raising, installed=False)
        return
    requests = Requests(raising)
    requests._install()
    _active = requests
    try:
        yield requests
    finally:
        _active = None
        requests._uninstall()


def _after_fork_in_child():
    """A forked child (a DataLoader worker) must not write its signals into the parent's pipe."""
    global _active
    if _active is not None:
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        for fd in (_active._r, _active._w):
            try:
                os.close(fd)
            except OSError:
                pass
        _active = None


os.register_at_fork(after_in_child=_after_fork_in_child)


# --- where a run acts on them ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    stop: int    # the signal to stop for, 0 to go on
    save: bool   # save a checkpoint and go on


class SafePoints:
    """The points where a run acts on the requests. Every rank calls poll() at the same points (after each
    optimizer step; after each evaluation batch that every rank has), and all ranks get the same decision:
    under torch.distributed the requests travel in an asynchronous all-reduce, so a decision is one poll old
    and costs no host-device sync. Construct it on every rank (it creates a process group)."""

    def __init__(self, distributed_run: bool):
        self._flags = distributed.AsyncMax(2) if distributed_run else None

    def poll(self) -> Decision:
        r = _active
        local = [int(r.stop), int(r.save)] if r is not None else [0, 0]
        agreed = local if self._flags is None else self._flags.exchange(local)
        if agreed[1] and r is not None:
            r.save = False  # served now (a request that came since is served by this same save)
        return Decision(stop=int(agreed[0]), save=bool(agreed[1]))


def exit_message(e: Stopped, where: str) -> str:
    return f"stopped by {e} {where}: nothing to save"


def report_stopped(e: Stopped, where: str) -> int:
    print(exit_message(e, where), file=sys.stderr, flush=True)
    return e.exit_code
