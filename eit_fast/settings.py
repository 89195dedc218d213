"""Command-line settings checks shared by `eit_fast.train` and `eit_fast.evaluate`.

Every numeric flag has a valid range, checked before any work; a YAML value goes through the same
conversion (type, choices) as the command line. Problems are `ConfigError`s worded like argparse's
("argument --lr: ..."), so the CLIs print one `error:` line and exit non-zero.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import torch

from .configs import ConfigError


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


@dataclass(frozen=True)
class Range:
    """lo <= value <= hi (or < with the *_open flags); None leaves a side unbounded. Floats must be finite."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts) or "finite"

    def contains(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)


POSITIVE = Range(1)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)
RATE = Range(0, 1, hi_open=True)      # dropout-like rates: 1 would drop everything
SEED = Range(0, 2**63 - 1)


def check_ranges(args: argparse.Namespace, ranges: dict[str, Range]):
    """ConfigError naming the first flag whose value (if set) is outside its range."""
    for dest, r in ranges.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"argument {flag(dest)}: expected a number, got {v!r}")
        if not r.contains(v):
            raise ConfigError(f"argument {flag(dest)}: must be {r.describe()}, got {v!r}")


def convert_setting(action: argparse.Action, value: Any, source: str) -> Any:
    """A YAML value converted and checked the way argparse would treat it on the command line."""
    where = f"{source}: {action.dest}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if value is None:
        if action.default is not None:
            raise ConfigError(f"{where}: needs a value (null is only allowed where the flag has no default)")
        return None
    if isinstance(value, (bool, list, dict)):
        raise ConfigError(f"{where}: expected a single {getattr(action.type, '__name__', 'string')}, "
                          f"got {value!r}")
    kind = action.type or str
    if kind is int and isinstance(value, float):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    try:
        converted = kind(value if kind is not str else str(value))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{where}: invalid choice {converted!r} (choose from "
                          f"{', '.join(map(repr, action.choices))})")
    return converted


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N' as a device this machine has; ConfigError otherwise."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"argument --device: {spec!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"argument --device: {spec!r} is not supported (auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise ConfigError(f"argument --device: {spec} asked for, but this machine has no usable CUDA GPU "
                          f"(torch.cuda.is_available() is False); use --device cpu")
    count = torch.cuda.device_count()
    if dev.index is None:
        return torch.device("cuda", local_rank % count)
    if dev.index >= count:
        raise ConfigError(f"argument --device: {spec} asked for, but this machine has {count} GPU(s)")
    return dev
