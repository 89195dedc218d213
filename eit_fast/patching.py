"""`patch(model)` and `unpatch(model)`: swap a built model's reference modules for the fused ones and back,
in place.

The fused modules have the reference's parameter names (they are the same module objects with another
class), so a state dict (and the authors' checkpoints) moves between the two unchanged, before or after.
Whether a path can take the model is its provider's `applies_to` alone (eit_fast.runtime).
"""
from __future__ import annotations

import torch.nn as nn

from .runtime import FAST_PATHS, ImplError, fast_path_status, provider, record_selection


def patch(model: nn.Module, strict: bool = False, model_name: str = "", requested: str | None = None) -> nn.Module:
    """Swap in the fused module of every fast path that applies to `model`; return the model.

    strict=True (impl="fused"): every path that has parts in the model is fused and always used; raise
    ImplError naming each one that cannot run here or cannot compute those parts.
    strict=False (impl="auto"): the paths that can run are swapped in under measurement: eit_fast.autotune
    times each against the reference per case and uses it only where it wins. `eit_fast.info()` says what
    was left out and why, and what was measured.
    """
    requested = requested or ("fused" if strict else "auto")
    status = fast_path_status()
    taken, skipped, refused = [], [], []
    plan = []
    for name in FAST_PATHS:
        mod = provider(name)
        if mod is None:
            skipped.append(f"{name}: {status[name]['reason']}")
            continue
        verdict = mod.applies_to(model)
        if not verdict.applies:
            if verdict.unsupported:
                refused.append(f"the fused {name} does not support {verdict.reason}")
                skipped.append(f"{name}: does not support {verdict.reason}")
            else:
                skipped.append(f"{name}: does not apply ({verdict.reason})")
            continue
        if not status[name]["available"]:
            refused.append(f"the fused {name} cannot run: {status[name]['reason']}")
            skipped.append(f"{name}: {status[name]['reason']}")
            continue
        plan.append((name, mod))
    if strict and refused:
        raise ImplError(f"impl='fused' was requested but {'; '.join(refused)}. Use impl='reference', or "
                        f"impl='auto' to take the fused paths that can run where they are faster.")
    if strict and not plan:
        raise ImplError(f"impl='fused' was requested but no fused path applies ({'; '.join(skipped)}). "
                        f"Use impl='reference'.")
    for name, mod in plan:
        if mod.swap(model, auto=not strict) or _already(mod, model):
            taken.append(name)
    model.impl = ("fused" if strict else "auto") if taken else "reference"
    if strict:
        reason = f"{requested}: fused {', '.join(taken)}"
    elif taken:
        reason = f"{requested}: {', '.join(taken)} measured against the reference per case (eit_fast.autotune)"
    else:
        reason = f"{requested}: no fused path can run, using the reference model"
    if skipped:
        reason += f"; not fused: {'; '.join(skipped)}"
    record_selection(model=model_name or type(model).__name__, requested=requested, chosen=model.impl,
                     fused=taken, reason=reason)
    return model


def _already(mod, model) -> bool:
    """The path's modules were swapped in before (patching twice is harmless)."""
    return bool(getattr(mod, "swapped", lambda m: 0)(model))


def unpatch(model: nn.Module) -> nn.Module:
    """Turn every fused module of `model` back into its reference module, in place (same parameters, so
    the outputs are the reference's); return the model. Models that were never patched are unchanged."""
    for name in FAST_PATHS:
        mod = provider(name)
        if mod is not None:
            mod.unswap(model)
    if hasattr(model, "impl"):
        model.impl = "reference"
    return model


def fuse_what_runs(model: nn.Module) -> tuple[list[str], list[str]]:
    """Swap in, always taken (no measuring), every fused path that applies to `model` and can run here, and
    leave the others out: what impl="fused" gives where every path can run, and the "fused" path of the
    benchmarks where some cannot. Returns (paths taken, "path: why not" for the rest)."""
    status = fast_path_status()
    taken, left = [], []
    for name in FAST_PATHS:
        mod = provider(name)
        verdict = mod.applies_to(model) if mod is not None else None
        if mod is None or not verdict.applies:
            left.append(f"{name}: {status[name]['reason'] if mod is None else verdict.reason}")
        elif not status[name]["available"]:
            left.append(f"{name}: {status[name]['reason']}")
        else:
            mod.swap(model, auto=False)
            taken.append(name)
    if hasattr(model, "impl"):
        model.impl = "fused" if taken else "reference"
    return taken, left
