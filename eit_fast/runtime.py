"""Which implementation runs: the impl switch, the fast paths this install has, and `info()`.

impl="reference" is the plain-PyTorch model; "fused" demands the fast kernels for every part of the model
they cover and refuses if one cannot run; "auto" takes each fast path that can run and records why through
`info()`.

Each fast path is provided by a module under eit_fast.modules (see _PROVIDERS). A provider module defines:
  availability() -> (bool, str)      whether this machine can run it, and why (not)
  applies_to(model) -> str | None    None if the model has parts this path replaces, else why not
  swap(model) -> int                 replace those parts in place (same parameters), return how many
"""
from __future__ import annotations

import importlib
import os
import platform

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


def provider(name: str):
    """The module that implements fast path `name`, or None if this version has none."""
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
    """What this install can run, and what the last create_model() / patch() chose."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from . import __version__
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
        "last_selection": dict(_last_selection),
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
    if d["last_selection"]:
        sel = d["last_selection"]
        lines.append(f"last create_model({sel['model']!r}) / patch(): {sel['reason']}")
    return "\n".join(lines)
