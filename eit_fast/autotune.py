"""`impl="auto"` by measurement: the first time a fused module meets a case, it times itself against the
reference side by side and keeps the winner, as cudnn.benchmark does (docs/design.md section 3).

A case is what a measurement depends on: the fast path, the device (GPU name, or "cpu"), the dtype and the
autocast dtype, training or inference (with or without autograd), and the shapes the path's provider says
matter (`case_key`). The fused and the reference forward (and, when training, backward) run interleaved
through eit_fast.timing; the faster is kept, and a tie (within 5%) goes to the one with the lower peak
memory, else to the reference: a path is never taken that was not seen to win. An error or out-of-memory
in the fused trial keeps the reference for that case. Measuring leaves no trace: the RNG states, the
module's gradients and buffers are restored, and the trial runs on copies of the inputs.

Choices live in one process-wide book, cached on disk per machine and software (`cache_file()`; written
atomically; a corrupt or foreign file is ignored and rewritten). A training run makes its choices once
(`prepare` at the first step, on rank 0), shares them (`export` / `pin`: every rank uses rank 0's, and they
go into the run folder and the checkpoint), and from then on measures nothing: a case met later (a partial
last batch, an evaluation shard) takes the choice of the nearest batch size of the same case.

EIT_FAST_AUTOTUNE=0 turns measuring off: a cached choice is used where there is one, else the reference.
EIT_FAST_CACHE_DIR overrides the cache folder (default $XDG_CACHE_HOME/eit_fast, else ~/.cache/eit_fast).
Kernel-config choices (`pick`) share the same book, cache, export and pinning.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from . import machine, timing
from .fileio import WriteError, atomic_write_json

ENV_AUTOTUNE = "EIT_FAST_AUTOTUNE"
ENV_CACHE_DIR = "EIT_FAST_CACHE_DIR"
TIE = 0.05            # relative difference under which two paths tie
TRIAL_SECONDS = 0.25  # timed seconds per path and case (at least MIN_ITERS runs)
MIN_ITERS, MAX_ITERS = 3, 20
FORMAT, VERSION = "eit_fast.autotune", 1

__all__ = ["Choice", "AutoSelected", "prepare", "pin", "unpin", "export", "pick", "measuring_enabled",
           "cache_dir", "cache_file", "status", "choices_report", "format_choices", "use_timer", "reset"]


@dataclass
class Choice:
    """Which implementation a case runs, and the evidence."""
    path: str
    case: str                 # the readable case key (also the book's key)
    impl: str                 # "fused" | "reference"
    how: str                  # measured | cached | pinned | nearest | autotune off | under torch.compile | error
    fused_s: Optional[float] = None
    reference_s: Optional[float] = None
    fused_peak: Optional[int] = None
    reference_peak: Optional[int] = None
    note: str = ""
    measured_eagerly: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Choice":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def speedup(self) -> Optional[float]:
        if self.fused_s and self.reference_s:
            return self.reference_s / self.fused_s
        return None


@dataclass
class _Case:
    path: str
    base: str         # everything but the batch size
    batch: int
    device_part: str  # the device component of base (a pinned book may be resumed on another device)

    @property
    def key(self) -> str:
        return f"{self.base}|batch={self.batch}"


@dataclass
class _Book:
    choices: dict = field(default_factory=dict)     # case key -> Choice
    configs: dict = field(default_factory=dict)     # "op|key" -> option name (kernel configs)
    used: dict = field(default_factory=dict)        # case key -> Choice, as this process resolved it
    pinned: bool = False
    disk_loaded: bool = False
    warned: set = field(default_factory=set)


_BOOK = _Book()
_GENERATION = 0  # bumped whenever the book changes under the modules' per-call caches
_LOCK = threading.RLock()
_TIMER: Callable = timing.side_by_side


def reset() -> None:
    """Forget every choice of this process (tests; a new book reads the disk cache again)."""
    global _BOOK
    with _LOCK:
        _BOOK = _Book()
        _renew()


@contextlib.contextmanager
def use_timer(timer: Callable):
    """Measure with `timer(fns, device, warmup=, iters=) -> {name: Timing}` instead of eit_fast.timing's
    (tests inject one: timing never goes in tests)."""
    global _TIMER
    old, _TIMER = _TIMER, timer
    try:
        yield
    finally:
        _TIMER = old


def measuring_enabled() -> bool:
    return os.environ.get(ENV_AUTOTUNE, "1") != "0"


# --- the disk cache ---------------------------------------------------------------------------------------

def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eit_fast"


def _hash_files(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        try:
            with open(p, "rb") as f:
                h.update(os.path.basename(p).encode() + b"\0" + hashlib.sha256(f.read()).digest())
        except OSError:
            h.update(os.path.basename(p).encode() + b"\0missing")
    return h.hexdigest()[:16]


def fingerprint() -> dict:
    """What makes a measurement valid: machine, software and the exact kernels (built extension and sources)."""
    pkg = Path(__file__).resolve().parent
    ext = glob.glob(str(pkg / "_C*.so")) + glob.glob(str(pkg / "_C*.pyd"))
    sources = glob.glob(str(pkg / "kernels" / "*.py")) + glob.glob(str(pkg / "ops" / "*.py")) + \
        glob.glob(str(pkg / "modules" / "*.py"))
    d = machine.describe()
    d.pop("cpu_count", None)
    d["extension"] = _hash_files(ext) if ext else None
    d["kernel_sources"] = _hash_files(sources)
    return d


def cache_file() -> Path:
    fp = json.dumps(fingerprint(), sort_keys=True)
    return cache_dir() / f"autotune-{hashlib.sha256(fp.encode()).hexdigest()[:16]}.json"


def _read_cache(path: Path) -> tuple[dict, dict]:
    """(choices, configs) from the cache file; empty for a missing, corrupt or foreign one."""
    try:
        with open(path) as f:
            d = json.load(f)
        if not (isinstance(d, dict) and d.get("format") == FORMAT and d.get("version") == VERSION
                and d.get("fingerprint") == json.loads(json.dumps(fingerprint()))):
            return {}, {}
        choices = {k: Choice.from_dict(v) for k, v in d.get("choices", {}).items()}
        configs = {str(k): str(v) for k, v in d.get("configs", {}).items()}
        return choices, configs
    except (OSError, ValueError, TypeError, AttributeError):
        return {}, {}


def _load_disk():
    if _BOOK.disk_loaded:
        return
    _BOOK.disk_loaded = True
    choices, configs = _read_cache(cache_file())
    for k, c in choices.items():
        c.how = "cached"
        _BOOK.choices.setdefault(k, c)
    for k, v in configs.items():
        _BOOK.configs.setdefault(k, v)


def _save_disk():
    path = cache_file()
    on_disk, disk_configs = _read_cache(path)  # another process may have added choices meanwhile
    choices = {**{k: c.to_dict() for k, c in on_disk.items()},
               **{k: c.to_dict() for k, c in _BOOK.choices.items() if c.how in ("measured", "cached")}}
    for c in choices.values():
        c["how"] = "measured"
    data = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint(), "choices": choices,
            "configs": {**disk_configs, **_BOOK.configs}}
    try:
        atomic_write_json(path, data, what="auto-selection cache")
    except WriteError as e:
        _warn_once(f"cache:{e}", f"eit_fast auto: {e}; the choices are kept in memory only")


def _warn_once(key: str, msg: str):
    if key not in _BOOK.warned:
        _BOOK.warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# --- cases ------------------------------------------------------------------------------------------------

def _device_part(t: torch.Tensor) -> str:
    if t.device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(t.device)}"
    return t.device.type


def _case(module, args) -> _Case:
    x = args[0]
    dev = x.device.type
    ac = torch.get_autocast_dtype(dev) if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) else None
    dtype = str(x.dtype).replace("torch.", "") + (f"+autocast:{str(ac).replace('torch.', '')}" if ac else "")
    mode = ("train" if module.training else "eval") + ("+grad" if torch.is_grad_enabled() else "")
    batch, shape = module.case_key(args)
    device = _device_part(x)
    base = f"{module.fast_path}|{device}|{dtype}|{mode}|{shape}"
    return _Case(module.fast_path, base, int(batch), device)


def _nearest(case: _Case) -> Optional[Choice]:
    """The choice of the same case at the nearest batch size (log scale); a pinned book resumed on another
    device matches the case without its device part."""
    def same(k: str, strip_device: bool) -> bool:
        base = k.rsplit("|batch=", 1)[0]
        if strip_device:
            return base.replace(base.split("|")[1], "", 1) == case.base.replace(case.device_part, "", 1)
        return base == case.base
    for strip in (False, True):
        cands = [(abs(math.log(max(int(k.rsplit("=", 1)[1]), 1)) - math.log(max(case.batch, 1))), k)
                 for k in _BOOK.choices if "|batch=" in k and same(k, strip)]
        if cands:
            return _BOOK.choices[min(cands)[1]]
    return None


# --- measuring --------------------------------------------------------------------------------------------

def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _clone(a):
    if isinstance(a, torch.Tensor):
        c = a.detach().clone()
        return c.requires_grad_(a.requires_grad)
    return a


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _decide(path: str, case: str, t: dict) -> Choice:
    f, r = t["fused"], t["reference"]
    c = Choice(path, case, "reference", "measured", f.median_s, r.median_s, f.peak_bytes, r.peak_bytes)
    if abs(f.median_s - r.median_s) > TIE * min(f.median_s, r.median_s):
        c.impl = "fused" if f.median_s < r.median_s else "reference"
        c.note = f"{'fused' if c.impl == 'fused' else 'reference'} faster by " \
                 f"{max(f.median_s, r.median_s) / min(f.median_s, r.median_s):.2f}x"
    elif f.peak_bytes is not None and r.peak_bytes is not None and f.peak_bytes < r.peak_bytes:
        c.impl, c.note = "fused", "tie within 5%; fused uses less peak memory"
    else:
        c.note = "tie within 5%; the fused path uses no less memory, so the reference is kept"
    return c


def _measure(module, case: _Case, args) -> Choice:
    """Time the module's fused and reference forward (and backward, when training) on copies of args."""
    x = args[0]
    device = x.device
    backward = module.training and torch.is_grad_enabled()
    params = [p for p in module.parameters()]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    buffers = {k: b.detach().clone() for k, b in module.named_buffers()}
    rng = _rng_state(device)
    fused_fwd, ref_fwd = module._fused_forward, module._reference_forward
    trial_args = tuple(_clone(a) for a in args)
    try:
        out = ref_fwd(module, *trial_args)  # shapes the output gradient; also warms the reference
        grad_out = torch.randn_like(out) if backward else None

        def runner(fwd):
            def run():
                o = fwd(module, *trial_args)
                if backward:
                    o.backward(grad_out)
                    for a in trial_args:
                        if isinstance(a, torch.Tensor):
                            a.grad = None
                return o
            return run
        try:
            runner(fused_fwd)()
        except Exception as e:  # noqa: BLE001 - any failure of the fused trial keeps the reference
            why = "out of memory" if _is_oom(e) else f"{type(e).__name__}: {e}"
            return Choice(case.path, case.key, "reference", "error", note=f"the fused trial failed ({why})")
        start = time.perf_counter()
        runner(ref_fwd)()
        runner(fused_fwd)()
        per_round = max(time.perf_counter() - start, 1e-6)
        iters = int(min(MAX_ITERS, max(MIN_ITERS, TRIAL_SECONDS * 2 / per_round)))
        try:
            t = _TIMER({"fused": runner(fused_fwd), "reference": runner(ref_fwd)}, device, warmup=1, iters=iters)
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            return Choice(case.path, case.key, "reference", "error", note="out of memory while timing")
        return _decide(case.path, case.key, t)
    finally:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = g
            for k, b in module.named_buffers():
                b.copy_(buffers[k])
        _set_rng_state(device, rng)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _resolve(module, args) -> Choice:
    case = _case(module, args)
    with _LOCK:
        cannot = module.cannot_run(args)
        if cannot:  # this input has no fused kernel: nothing to measure
            c = Choice(case.path, case.key, "reference", "no kernel", note=cannot)
            _BOOK.choices.setdefault(case.key, c)
            return c
        _load_disk()
        c = _BOOK.choices.get(case.key)
        if c is not None:
            return c
        if _BOOK.pinned:
            near = _nearest(case)
            if near is None:
                c = Choice(case.path, case.key, "reference", "pinned",
                           note="the run's choices were fixed at its first step and have no comparable case")
            else:
                c = Choice(case.path, case.key, near.impl, "nearest", near.fused_s, near.reference_s,
                           near.fused_peak, near.reference_peak, note=f"as {near.case}")
        elif not measuring_enabled():
            c = Choice(case.path, case.key, "reference", "autotune off",
                       note=f"{ENV_AUTOTUNE}=0 and no cached choice")
        else:
            c = _measure(module, case, args)
            _BOOK.choices[case.key] = c
            if c.how == "measured":
                _save_disk()
            return c
        _BOOK.choices[case.key] = c
        return c


class AutoSelected:
    """Mixin of the fused modules' impl="auto" classes: forward runs the fused or the reference forward, as
    the book chose for this case. Subclasses set fast_path, _fused_forward, _reference_forward and define
    case_key(args) -> (batch, "shape facts")."""

    fast_path = ""

    def cannot_run(self, args) -> Optional[str]:
        """Why the fused path has no kernel for these inputs (then the reference runs, unmeasured)."""
        return None

    def forward(self, *args):
        if torch.compiler.is_compiling():
            use_fused = self._compiled_choice(args)
        else:
            sig = self._shape_sig(args)
            seen = self.__dict__.get("_traced_choices")
            if seen is None or self.__dict__.get("_book_generation") != _GENERATION or sig not in seen:
                c = _resolve(self, args)  # a new case for this module (or a changed book): look it up
                _BOOK.used[c.case] = c
                if self.__dict__.get("_book_generation") != _GENERATION:
                    self.__dict__["_book_generation"], self.__dict__["_traced_choices"] = _GENERATION, {}
                self.__dict__["_traced_choices"][sig] = c.impl == "fused"
            use_fused = self.__dict__["_traced_choices"][sig]
        return (self._fused_forward if use_fused else self._reference_forward)(self, *args)

    def _shape_sig(self, args) -> tuple:
        """What the case key depends on, cheap to compute: the per-call fast lookup (and, under
        torch.compile, the only one)."""
        x = args[0]
        dev = x.device.type
        ac = torch.get_autocast_dtype(dev) if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) else None
        return (tuple(x.shape), x.dtype, ac, x.device, self.training, torch.is_grad_enabled(),
                x.is_contiguous(), tuple(args[1]) if len(args) > 1 else ())

    def _compiled_choice(self, args) -> bool:
        """Under torch.compile: the choice this module made eagerly for these shapes; without one, the
        reference (measuring cannot run while tracing; `prepare` before compiling measures)."""
        choices = self.__dict__.get("_traced_choices", {})
        try:
            return choices.get(self._shape_sig(args), False)
        except TypeError:  # symbolic sizes (dynamic shapes, torch.export): fused only if it won every case
            return bool(choices) and all(choices.values())


def prepare(model: torch.nn.Module, example: torch.Tensor, *, train: bool = True, evaluate: bool = True,
            autocast: Optional[Callable[[], Any]] = None, backward: bool = True) -> dict:
    """Make the model's choices for `example` now, before a training loop or torch.compile: one forward
    (and backward) in training mode and one in eval mode, measuring wherever a case is new. Leaves no trace:
    the RNG states, the gradients and the train/eval mode are restored. Returns `export()`.

    It also runs impl="fused" models once, so kernel-config choices (`pick`) are made before `export`."""
    autocast = autocast or contextlib.nullcontext
    device = example.device
    was_training = model.training
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    rng = _rng_state(device)
    try:
        if train:
            model.train()
            with autocast():
                out = model(example)
            if backward and out.requires_grad:
                out.float().sum().backward()
        if evaluate:
            model.eval()
            with torch.no_grad(), autocast():
                model(example)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for p, g in grads.items():
                p.grad = g
        _set_rng_state(device, rng)
    return export()


def export() -> dict:
    """This process's choices and kernel configs, JSON-able: for the run folder, checkpoints, other ranks."""
    with _LOCK:
        return {"format": FORMAT, "version": VERSION,
                "choices": {k: c.to_dict() for k, c in _BOOK.choices.items()},
                "configs": dict(_BOOK.configs)}


def pin(choices: Optional[Mapping] = None) -> None:
    """Fix the book: from now on nothing is measured. With `choices` (an `export()`, e.g. rank 0's or a
    checkpoint's), those replace this process's."""
    with _LOCK:
        _load_disk()
        if choices is not None:
            if not (isinstance(choices, Mapping) and choices.get("format") == FORMAT):
                raise ValueError("not an eit_fast.autotune export")
            _BOOK.choices = {k: Choice.from_dict(v) for k, v in choices.get("choices", {}).items()}
            for c in _BOOK.choices.values():
                if c.how not in ("pinned", "nearest"):
                    c.how = "pinned"
            _BOOK.configs = dict(choices.get("configs", {}))
        _BOOK.pinned = True
        _renew()


def unpin() -> None:
    with _LOCK:
        _BOOK.pinned = False
        _renew()


def _renew():
    """Invalidate every module's per-call cache of choices (the book changed)."""
    global _GENERATION
    _GENERATION += 1


def pick(op: str, key: str, options: Sequence[str], measure: Optional[Callable[[str], float]] = None) -> str:
    """A kernel config for (op, key): the book's (pinned, cached or measured before), else the fastest of
    `options` by `measure(option) -> seconds` where measuring is allowed (not pinned, not tracing,
    EIT_FAST_AUTOTUNE not 0), else options[0]."""
    name = f"{op}|{key}"
    with _LOCK:
        _load_disk()
        got = _BOOK.configs.get(name)
        if got in options:
            return got
        if _BOOK.pinned or measure is None or not measuring_enabled() or torch.compiler.is_compiling() \
                or len(options) == 1:
            return options[0]
        times = {o: measure(o) for o in options}
        best = min(options, key=lambda o: times[o])
        _BOOK.configs[name] = best
        _save_disk()
        return best


# --- reporting --------------------------------------------------------------------------------------------

def choices_report() -> list[dict]:
    """The choices this process used, for info()['last_selection']['choices']."""
    with _LOCK:
        return [c.to_dict() for c in _BOOK.used.values()]


def status() -> dict:
    if not measuring_enabled():
        mode = f"measuring off ({ENV_AUTOTUNE}=0): cached choices, else the reference"
    elif _BOOK.pinned:
        mode = "choices fixed (pinned): nothing is measured"
    else:
        mode = "measures each new case (fused vs reference), keeps the faster"
    path = cache_file()
    cached, _ = _read_cache(path)
    return {"mode": mode, "cache_file": str(path), "cached": len(cached),
            "cached_choices": [c.to_dict() for c in cached.values()]}


def format_choices(choices: Optional[list[dict]]) -> str:
    if not choices:
        return ""
    lines = ["auto choices:"]
    for c in choices:
        times = ""
        if c.get("fused_s") is not None and c.get("reference_s") is not None:
            times = f"  fused {c['fused_s'] * 1e3:.2f} ms vs reference {c['reference_s'] * 1e3:.2f} ms"
        lines.append(f"  {c['impl']:<9} {c['how']:<12} {c['case']}{times}" + (f"  ({c['note']})" if c.get("note")
                                                                             else ""))
    return "\n".join(lines)
