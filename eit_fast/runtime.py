"""Which implementation runs: the impl switch, the fast paths this install has, and `info()`.

impl="reference" is the plain-PyTorch model. "fused" swaps in the fused module of every fast path that has
parts in the model, and refuses if one cannot run or cannot compute them. "auto" swaps in the paths that can
run and lets `eit_fast.autotune` measure, per case, whether each is faster than the reference; a path is
taken only where it was seen to win (docs/design.md section 3).

Each fast path is provided by a module under eit_fast.modules (see _PROVIDERS), which is the one judge of
whether a model can take it. A provider module defines:
  availability() -> (bool, str)      whether this machine can run it, and why (not)
  applies_to(model) -> Verdict       whether the model has parts it replaces, and whether it can compute them
  swap(model, auto) -> int           replace those parts in place (same parameters), return how many
  unswap(model) -> int               turn them back into the reference modules, return how many
  case_key(module, args) -> tuple    the input facts a measurement depends on (shapes that matter)
"""
from __future__ import annotations

import importlib
import os
import platform
from dataclasses import dataclass

import torch

IMPLS = ("reference", "fused", "auto")
ENV_IMPL = "EIT_FAST_IMPL"

FAST_PATHS = {
    "block_mixer": "Triton kernel: attention + parallel depthwise-conv branch of an EIT block",
    "patch_projection": "CUDA/C++ extension eit_fast._C: conv + max-pool patch projection",
}
_PROVIDERS = {
    "block_mixer": "eit_fast.modules.fused_block",
    "patch_projection": "eit_fast.modules.fused_patch",
}
_NOT_BUILT = "not part of this version of eit_fast yet"

_last_selection: dict = {}


class ImplError(RuntimeError):
    """The requested implementation cannot run here."""


@dataclass(frozen=True)
class Verdict:
    """A provider's judgement of a model. applies: the model has parts for the path and the path computes
    them exactly. Otherwise `unsupported` says whether it has such parts with options the path lacks (then
    impl="fused" refuses) or has none at all (then the path is simply not needed); `reason` says which."""
    applies: bool
    reason: str
    unsupported: bool = False

    @classmethod
    def yes(cls, reason: str = "applies") -> "Verdict":
        return cls(True, reason)

    @classmethod
    def absent(cls, reason: str) -> "Verdict":
        return cls(False, reason)

    @classmethod
    def cannot(cls, reason: str) -> "Verdict":
        return cls(False, reason, unsupported=True)


def provider(name: str):
    """The module that implements fast path `name`, or None if this version has none.

    Only the provider module itself being absent means "none": an import error inside it (a kernel module
    that fails to import, a missing dependency) propagates as what it is."""
    mod_name = _PROVIDERS[name]
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            return None
        raise


def fast_path_status() -> dict[str, dict]:
    out = {}
    for name, what in FAST_PATHS.items():
        mod = provider(name)
        available, reason = (False, _NOT_BUILT) if mod is None else mod.availability()
        out[name] = {"what": what, "available": bool(available), "reason": reason}
    return out


def default_impl() -> str:
    impl = os.environ.get(ENV_IMPL, "reference")
    if impl not in IMPLS:
        raise ImplError(f"{ENV_IMPL}={impl!r} is not one of {IMPLS}")
    return impl


def resolve_impl(impl: str | None) -> str:
    """The requested impl (argument, else $EIT_FAST_IMPL, else "reference"), validated."""
    requested = default_impl() if impl is None else impl
    if requested not in IMPLS:
        raise ImplError(f"impl must be one of {IMPLS}, got {requested!r}")
    return requested


def record_selection(**fields) -> None:
    _last_selection.clear()
    _last_selection.update(fields)


def info() -> dict:
    """What this install can run, what the last create_model() / patch() chose, and what `auto` measured."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from . import __version__, autotune
    sel = dict(_last_selection)
    if sel:
        sel["choices"] = autotune.choices_report()
    return {
        "eit_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "default_impl": os.environ.get(ENV_IMPL, "reference"),
        "fast_paths": fast_path_status(),
        "autotune": autotune.status(),
        "last_selection": sel,
    }


def format_info(d: dict) -> str:
    lines = [f"eit_fast {d['eit_fast']}  python {d['python']}  torch {d['torch']} (CUDA {d['torch_cuda']})  "
             f"triton {d['triton']}",
             f"GPU: {', '.join(d['devices']) if d['devices'] else 'none visible'}",
             f"default impl: {d['default_impl']}  (set {ENV_IMPL}=reference|fused|auto)",
             "fast paths:"]
    for name, st in d["fast_paths"].items():
        state = f"usable: {st['reason']}" if st["available"] else f"not usable: {st['reason']}"
        lines.append(f"  {name:<17} {state}\n  {'':<17} ({st['what']})")
    at = d["autotune"]
    lines.append(f"auto: {at['mode']}; cache {at['cache_file']} ({at['cached']} cached choices for this machine)")
    sel = d["last_selection"]
    if sel:
        lines.append(f"last create_model({sel['model']!r}) / patch(): {sel['reason']}")
    from .autotune import format_choices
    table = format_choices(sel.get("choices") if sel else None)
    if table:
        lines.append(table)
    elif at["cached_choices"]:  # a fresh process (python -m eit_fast.info): what this machine measured before
        lines.append(format_choices(at["cached_choices"]).replace("auto choices:", "cached auto choices:", 1))
    return "\n".join(lines)
