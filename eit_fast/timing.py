"""The one timing helper: `auto`'s measurements, `python -m eit_fast.bench` and the kernel benchmarks in bench/
all time through `side_by_side` (docs/design.md section 6).

Several callables are timed interleaved (a, b, a, b, ...) so that a change in the machine's state (clock,
other load) falls on all of them alike. On a GPU each call is timed with CUDA events on the current stream
after a warm-up; on the CPU with perf_counter. Peak memory is measured per callable, in a separate run after
the timed ones: CUDA's max_memory_allocated above what was allocated before, or on the CPU the growth of the
process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs; None where that is refused).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Optional

import torch

__all__ = ["Timing", "side_by_side", "time_one", "peak_memory"]


@dataclass
class Timing:
    """Seconds per call: median and spread (interquartile range) of `samples`; peak memory in bytes."""
    median_s: float
    iqr_s: float
    min_s: float
    samples: list[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    method: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("samples")
        return d


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _summary(samples: list[float], method: str, peak: Optional[int]) -> Timing:
    lo, hi = _quartiles(samples)
    return Timing(statistics.median(samples), hi - lo, min(samples), list(samples), peak, method)


def _cpu_peak_rss() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> Optional[int]:
    """Bytes one call of fn adds at its peak over what was in use before it (None where not measurable)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    if not _reset_cpu_peak():
        return None
    base = _cpu_peak_rss()
    fn()
    peak = _cpu_peak_rss()
    return None if base is None or peak is None else max(0, peak - base)


def side_by_side(fns: Mapping[str, Callable[[], object]], device: torch.device | str, *, warmup: int = 2,
                 iters: int = 10, measure_memory: bool = True) -> dict[str, Timing]:
    """Time each callable `iters` times, interleaved, after `warmup` untimed rounds of each."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    if cuda:
        torch.cuda.synchronize(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    if cuda:
        events = {n: [] for n in names}
        for _ in range(iters):
            for n in names:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[n]()
                end.record()
                events[n].append((start, end))
        torch.cuda.synchronize(device)
        for n in names:
            samples[n] = [s.elapsed_time(e) / 1e3 for s, e in events[n]]
        method = "CUDA events, median of interleaved runs"
    else:
        for _ in range(iters):
            for n in names:
                t0 = time.perf_counter()
                fns[n]()
                samples[n].append(time.perf_counter() - t0)
        method = "perf_counter, median of interleaved runs"
    peaks = {n: peak_memory(fns[n], device) if measure_memory else None for n in names}
    return {n: _summary(samples[n], method, peaks[n]) for n in names}


def time_one(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 2, iters: int = 10,
             measure_memory: bool = True) -> Timing:
    return side_by_side({"fn": fn}, device, warmup=warmup, iters=iters, measure_memory=measure_memory)["fn"]
