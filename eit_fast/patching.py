"""`patch(model)`: swap a built model's reference modules for the fused ones, in place.

The fused modules have the reference's parameter names, so a state dict (and the authors' checkpoints)
moves between the two unchanged, before or after patching.
"""
from __future__ import annotations

import torch.nn as nn

from .runtime import FAST_PATHS, ImplError, fast_path_status, provider, record_selection


def patch(model: nn.Module, strict: bool = False, model_name: str = "", requested: str = "auto") -> nn.Module:
    """Swap in every fused module that applies to `model` and can run here; return the model.

    strict=False (impl="auto"): paths that cannot run are skipped, and `eit_fast.info()["last_selection"]`
    says why. strict=True (impl="fused"): raise ImplError naming each path that applies but cannot run.
    """
    status = fast_path_status()
    taken, skipped = [], []
    plan = []
    unsupported = model.fused_unsupported() if hasattr(model, "fused_unsupported") else {}
    for name in FAST_PATHS:
        mod = provider(name)
        if mod is None:
            skipped.append(f"{name}: {status[name]['reason']}")
            continue
        if name in unsupported:  # the model has parts for this path, with options it cannot compute
            if strict:
                raise ImplError(f"impl='fused' was requested but the fused {name} does not support "
                                f"{unsupported[name]}. Use impl='reference', or impl='auto' to fuse the rest.")
            skipped.append(f"{name}: does not support {unsupported[name]}")
            continue
        why_not = mod.applies_to(model)
        if why_not is not None:
            skipped.append(f"{name}: does not apply ({why_not})")
            continue
        if not status[name]["available"]:
            if strict:
                raise ImplError(f"impl='fused' was requested but the fused {name} cannot run: "
                                f"{status[name]['reason']}. Use impl='reference', or impl='auto' to take the "
                                f"fused paths that can run.")
            skipped.append(f"{name}: {status[name]['reason']}")
            continue
        plan.append((name, mod))
    if strict and not plan:
        raise ImplError(f"impl='fused' was requested but no fused path is available ({'; '.join(skipped)}). "
                        f"Use impl='reference', or impl='auto' to take fused paths when they exist.")
    for name, mod in plan:
        if mod.swap(model):
            taken.append(name)
    model.impl = "fused" if taken else "reference"
    reason = f"{requested}: " + (f"fused {', '.join(taken)}" if taken else "no fused path is available, "
                                                                           "using the reference model")
    if skipped:
        reason += f"; not fused: {'; '.join(skipped)}"
    record_selection(model=model_name or type(model).__name__, requested=requested, chosen=model.impl,
                     fused=taken, reason=reason)
    return model
