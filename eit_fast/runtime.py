"""Which implementation runs: the impl switch, the fast paths this install has, and `info()`.

impl="reference" is the plain-PyTorch model; "fused" demands the fast kernels and refuses if they are
missing; "auto" takes the fastest path available and records why through `info()`.
"""
from __future__ import annotations

import os
import platform

import torch

IMPLS = ("reference", "fused", "auto")
ENV_IMPL = "EIT_FAST_IMPL"

# The fused paths, and why each is not usable in this version. Kernel issues replace these entries with
# real availability checks (Triton importable, a GPU present, eit_fast._C built with CUDA, ...).
_NOT_BUILT = "not part of this version of eit_fast yet"
FAST_PATHS = {
    "block_mixer": "Triton kernel: attention + parallel depthwise-conv branch of an EIT block",
    "patch_projection": "CUDA/C++ extension eit_fast._C: conv + max-pool patch projection",
}

_last_selection: dict = {}


class ImplError(RuntimeError):
    """The requested implementation cannot run here."""


def fast_path_status() -> dict[str, dict]:
    return {name: {"what": what, "available": False, "reason": _NOT_BUILT} for name, what in FAST_PATHS.items()}


def default_impl() -> str:
    impl = os.environ.get(ENV_IMPL, "reference")
    if impl not in IMPLS:
        raise ImplError(f"{ENV_IMPL}={impl!r} is not one of {IMPLS}")
    return impl


def resolve_impl(impl: str | None, model_name: str = "") -> str:
    """Map a requested impl to the one that will run; raise if "fused" cannot be honoured."""
    requested = default_impl() if impl is None else impl
    if requested not in IMPLS:
        raise ImplError(f"impl must be one of {IMPLS}, got {requested!r}")
    usable = {k: v for k, v in fast_path_status().items() if v["available"]}
    if requested == "fused" and not usable:
        reasons = "; ".join(f"{k}: {v['reason']}" for k, v in fast_path_status().items())
        raise ImplError(f"impl='fused' was requested but no fused path is available ({reasons}). "
                        f"Use impl='reference', or impl='auto' to take fused paths when they exist.")
    if requested == "auto" and not usable:
        chosen, reason = "reference", "auto: no fused path is available, using the reference model"
    else:
        chosen, reason = requested, f"{requested}: as requested"
    _last_selection.clear()
    _last_selection.update(model=model_name, requested=requested, chosen=chosen, reason=reason)
    return chosen


def info() -> dict:
    """What this install can run, and what the last create_model() chose."""
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
        state = "usable" if st["available"] else f"not usable: {st['reason']}"
        lines.append(f"  {name:<17} {state}\n  {'':<17} ({st['what']})")
    if d["last_selection"]:
        sel = d["last_selection"]
        lines.append(f"last create_model({sel['model']!r}): {sel['reason']}")
    return "\n".join(lines)
