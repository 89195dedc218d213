"""`create_model`: named config + overrides -> a model of the chosen implementation (timm style)."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .checkpoint import load_checkpoint
from .configs import get_config, pretrained_cfg
from .models import EIT
from .models.baselines import baseline_config, create_baseline, is_baseline
from .patching import patch
from .runtime import record_selection, resolve_impl


def build_model(name: str, impl: str | None = None, device=None, dtype: Optional[torch.dtype] = None,
                **overrides) -> EIT:
    """The named model with config overrides, built on `device` in `dtype`, in the chosen implementation:
    impl="fused" is patch(strict=True), impl="auto" is patch(strict=False) (measured per case)."""
    cfg = get_config(name, **overrides)  # an unknown option raises a TypeError naming it
    requested = resolve_impl(impl)
    model = EIT(cfg, device=device, dtype=dtype)
    model.pretrained_cfg = pretrained_cfg(cfg, name)
    if requested == "reference":
        record_selection(model=name, requested=requested, chosen="reference", fused=[],
                         reason="reference: as requested")
    else:
        patch(model, strict=requested == "fused", model_name=name, requested=requested)
    return model


def create_model(name: str, impl: str | None = None, checkpoint_path: str | os.PathLike | None = None, *,
                 features_only: bool = False, out_indices: Union[int, Sequence[int]] = 3,
                 device=None, dtype: Optional[torch.dtype] = None, **overrides) -> nn.Module:
    """Build a named model, e.g. create_model("eit_mini", num_classes=100).

    impl: "reference" (plain PyTorch), "fused" (fast kernels, refuses if unavailable) or "auto" (each fast
    path measured against the reference per case, the faster kept; eit_fast.info() shows the choices).
    Default: $EIT_FAST_IMPL, else "reference".
    checkpoint_path: weights to load after building (eit_fast, authors' or bare state_dict, strict).
    features_only: wrap the model in timm's feature extractor (needs timm): its forward returns the
    out_indices blocks' outputs as (B, D, Hp, Wp) maps (an int n: the last n blocks).
    device, dtype: where and in which dtype the parameters are created.
    Overrides: any EITConfig field (num_classes=0 for pooled features, global_pool, img_size as an int or
    an (H, W) pair, dynamic_img_size, ...); an unknown keyword raises TypeError.
    """
    model = build_model(name, impl=impl, device=device, dtype=dtype, **overrides)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    if features_only:
        try:
            import timm  # noqa: F401
        except ImportError as e:
            raise ImportError("features_only=True wraps the model in timm's feature extractor: pip install "
                              "timm (or call model.forward_intermediates(x, indices) directly)") from e
        from timm.models._features import FeatureGetterNet  # what timm.create_model(features_only=True) uses
        model = FeatureGetterNet(model, out_indices=out_indices)
    return model


def named_config(name: str, **overrides):
    """The config of any model `python -m eit_fast.train` can train: a named EIT config or a baseline."""
    return baseline_config(name, **overrides) if is_baseline(name) else get_config(name, **overrides)


def create_trainable(name: str, impl: str | None = None, **overrides) -> nn.Module:
    """create_model for an EIT config name, create_baseline for a baseline's (eit_fast.models.baselines)."""
    return create_baseline(name, impl=impl, **overrides) if is_baseline(name) else \
        create_model(name, impl=impl, **overrides)


def model_from_config(config: dict) -> nn.Module:
    """The model a checkpoint's recorded config describes (EITConfig fields, or a baseline's)."""
    from .configs import EITConfig
    if "baseline" in config and is_baseline(config["baseline"]):
        fields = {k: v for k, v in config.items() if k != "baseline"}
        return create_baseline(config["baseline"], **fields)
    return EIT(EITConfig(**config))
