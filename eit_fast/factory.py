"""`create_model`: named config + overrides -> a model of the chosen implementation (timm style)."""
from __future__ import annotations

import os

import torch.nn as nn

from .checkpoint import load_checkpoint
from .configs import get_config
from .models import EIT
from .patching import patch
from .runtime import record_selection, resolve_impl


def create_model(name: str, impl: str | None = None, checkpoint_path: str | os.PathLike | None = None,
                 **overrides) -> nn.Module:
    """Build a named model, e.g. create_model("eit_mini", num_classes=100).

    impl: "reference" (plain PyTorch), "fused" (fast kernels, refuses if unavailable) or "auto" (fastest
    available; eit_fast.info() says which was taken). Default: $EIT_FAST_IMPL, else "reference".
    checkpoint_path: weights to load after building (eit_fast, authors' or bare state_dict, strict).
    """
    cfg = get_config(name, **overrides)
    requested = resolve_impl(impl)
    model = EIT(cfg)
    if requested == "reference":
        model.impl = "reference"
        record_selection(model=name, requested=requested, chosen="reference", fused=[],
                         reason="reference: as requested")
    else:
        patch(model, strict=requested == "fused", model_name=name, requested=requested)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model
