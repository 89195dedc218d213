"""Registers every named eit_fast model with timm (imported by eit_fast only when timm is importable).

timm.create_model(name, ...) then builds our EIT through timm's own build_model_with_cfg, so
features_only, out_indices, pretrained_cfg_overlay, device/dtype and the rest behave as for timm's models.
Extra keywords: `impl` ("reference" | "fused" | "auto", as eit_fast.create_model) and any EITConfig field.
"""
from __future__ import annotations

import functools

from timm.models import build_model_with_cfg, register_model

from .configs import CONFIGS, pretrained_cfg
from .factory import build_model

# timm's registry reads a model's pretrained_cfg from `default_cfgs` of the module that registers it.
default_cfgs = {name: pretrained_cfg(cfg, name) for name, cfg in CONFIGS.items()}


class NoPretrainedWeightsError(RuntimeError):
    """pretrained=True for a model that has no hub weights."""


def _create(name: str, pretrained: bool = False, **kwargs):
    if pretrained:
        raise NoPretrainedWeightsError(
            f"{name} has no hub weights, so pretrained=True has nothing to download. Load the authors' "
            f"checkpoint file (github.com/MrHaiPi/EIT, model/eit-16-4-3-*/best_checkpoint.pth) with "
            f"eit_fast.create_model({name!r}, checkpoint_path=PATH), or build with timm and then call "
            f"eit_fast.load_checkpoint(model, PATH) (timm's own checkpoint_path= refuses the authors' files: "
            f"they hold an argparse object, which eit_fast allow-lists).")
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        functools.partial(build_model, name), name, pretrained=False,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)


def _entrypoint(name: str):
    def create(pretrained: bool = False, **kwargs):
        return _create(name, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"eit_fast's {name} ({default_cfgs[name]['description']})."
    return create


for _name in CONFIGS:
    globals()[_name] = register_model(_entrypoint(_name))
