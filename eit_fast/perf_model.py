"""The one modelled-time helper (docs/design.md section 6): a kernel's or a step's time on a GPU, from the
work it does, against a device's limits. Every figure it gives is *modelled*, never measured; callers say so.

    time = max(bytes / bandwidth, MMA FLOPs / matrix rate, FMA FLOPs / FMA rate, exponentials / SFU rate)

`bytes` are what the kernels themselves load and store (or, for eager PyTorch, what every aten op reads and
writes: `count_traffic`), so the model is a floor for that schedule of work, not for the problem. The
limits are the H100 SXM datasheet's (3.35 TB/s; 990 TFLOP/s dense bf16/fp16, 495 tf32, 67 fp32 FMA) and,
for the H200 this project borrows, what was measured on it (4.3 TB/s device-to-device copy counting bytes
read and written; 790 TFLOP/s for a large bf16 matmul). Exponentials: 16 MUFU.EX2 per SM per clock, 132 SMs
at 1.83 GHz, about 3.9 T/s.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["DeviceLimits", "H100", "H200", "LIMITS", "Work", "Modelled", "modelled_time", "ByteCounter",
           "count_traffic", "nbytes"]


@dataclass(frozen=True)
class DeviceLimits:
    name: str
    source: str                 # "datasheet" or "measured"
    bytes_per_s: float
    mma_per_s: dict             # dense tensor-core FLOP/s by operand precision
    fma_per_s: float            # fp32 FMA FLOP/s (2 per FMA)
    exp_per_s: float


H100 = DeviceLimits("H100 SXM", "datasheet", 3.35e12, {"bf16": 990e12, "fp16": 990e12, "tf32": 495e12}, 67e12,
                    3.9e12)
H200 = DeviceLimits("H200", "measured", 4.3e12, {"bf16": 790e12, "fp16": 790e12, "tf32": 395e12}, 67e12, 3.9e12)
LIMITS = {"h100": H100, "h200": H200}


def limits_for(device_name: Optional[str]) -> DeviceLimits:
    """H200 figures for an H200, the H100 datasheet otherwise (the model's reference GPU)."""
    return H200 if device_name and "H200" in device_name.upper() else H100


@dataclass
class Work:
    """What a kernel (or a sum of kernels) does. FLOPs count 2 per multiply-add."""
    bytes: float = 0.0
    mma_flops: float = 0.0
    fma_flops: float = 0.0
    exps: float = 0.0
    precision: str = "bf16"     # the tensor cores' operand precision for mma_flops

    def __add__(self, other: "Work") -> "Work":
        if self.mma_flops and other.mma_flops and self.precision != other.precision:
            raise ValueError(f"cannot add {self.precision} and {other.precision} tensor-core work")
        return Work(self.bytes + other.bytes, self.mma_flops + other.mma_flops, self.fma_flops + other.fma_flops,
                    self.exps + other.exps, self.precision if self.mma_flops else other.precision)

    def scaled(self, k: float) -> "Work":
        return Work(self.bytes * k, self.mma_flops * k, self.fma_flops * k, self.exps * k, self.precision)


@dataclass
class Modelled:
    """A modelled time (seconds) and the term that bounds it; each term's own time beside it."""
    seconds: float
    bound: str
    terms: dict
    device: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.seconds * 1e3:.3f} ms modelled on {self.device} ({self.bound}-bound)"


def modelled_time(work: Work, limits: DeviceLimits = H100) -> Modelled:
    terms = {"memory": work.bytes / limits.bytes_per_s,
             "mma": work.mma_flops / limits.mma_per_s[work.precision] if work.mma_flops else 0.0,
             "fma": work.fma_flops / limits.fma_per_s,
             "exp": work.exps / limits.exp_per_s}
    bound = max(terms, key=terms.get)
    return Modelled(terms[bound], bound, terms, f"{limits.name} ({limits.source})")


def nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class ByteCounter(TorchDispatchMode):
    """Adds up the bytes every aten op reads (its tensor arguments) and writes (its tensor outputs); views and
    allocations move nothing. Ops whose name starts with one of `custom` are counted by custom[prefix](name,
    args, out) instead: a fused op's kernels know what they load and store."""

    FREE = {"aten.detach.default", "aten.empty.memory_format", "aten.empty_like.default",
            "aten.new_empty.default", "aten.empty_strided.default", "aten.lift_fresh.default",
            "aten.new_empty_strided.default", "aten._to_copy.default_noop"}

    def __init__(self, custom: Optional[dict[str, Callable]] = None):
        super().__init__()
        self.total, self.by_op, self.custom = 0, {}, dict(custom or {})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        prefix = next((p for p in self.custom if name.startswith(p)), None)
        if prefix is not None:
            n = self.custom[prefix](name, args, out)
        elif func.is_view or name in self.FREE:
            n = 0
        else:
            n = sum(nbytes(t) for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
        self.total += n
        self.by_op[name] = self.by_op.get(name, 0) + n
        return out


def count_traffic(fn: Callable[[], object], custom: Optional[dict[str, Callable]] = None) -> tuple[int, dict]:
    """(total bytes, bytes per op) that fn() moves, counted op by op (run it on meta tensors: free)."""
    counter = ByteCounter(custom)
    with counter:
        fn()
    return counter.total, counter.by_op
