"""What an exported file says about itself: the model, its preprocessing and its class names.

One flat {key: string} mapping, written into every format (ONNX metadata_props, the safetensors header,
an `eit_fast.json` extra file in TorchScript and ExportedProgram archives). String values are plain; all
others (lists, numbers, booleans, the config) are JSON. Keys follow timm's pretrained_cfg names:

  model            named config the weights were trained as (e.g. "eit_cifar"), when known
  config           the model config as JSON: rebuilds the model (eit_fast.factory.model_from_config)
  classes          JSON list of class names, index = output position, when the checkpoint records them
  num_classes, input_name, output_name
  input_size       [C, H, W] the model was built for; fixed_input_size: false when any size runs, down to
                   min_input_size
  interpolation, crop_pct, crop_mode, mean, std: the evaluation transform (resize the shorter side to
                   H / crop_pct with `interpolation`, centre-crop H x W, scale to [0, 1], (x - mean) / std)
  preprocessing    the same in words
  eit_fast_version, producer
  python -m eit_fast.export adds: source (the weights file's name), ema, and for safetensors train_args
"""
from __future__ import annotations

import json
from typing import Mapping, Optional, Sequence

import torch.nn as nn

from .. import __version__
from ..configs import eval_crop_pct
from ..data.augment import IMAGENET_MEAN, IMAGENET_STD
from .base import dynamic_size, in_chans, input_hw, output_name

INPUT_NAME = "image"
# The evaluation transform of models without a pretrained_cfg (the baselines): eit_fast's data pipeline
# normalises every data set with ImageNet statistics and resizes bicubically.
_DEFAULT_DATA = dict(interpolation="bicubic", crop_mode="center", mean=IMAGENET_MEAN, std=IMAGENET_STD)


def data_config(model: nn.Module) -> dict:
    """input_size, fixed_input_size, interpolation, crop_pct, crop_mode, mean, std of `model`."""
    h, w = input_hw(model)
    pc = getattr(model, "pretrained_cfg", None) or {}
    out = {k: pc.get(k, v) for k, v in _DEFAULT_DATA.items()}
    out["input_size"] = [in_chans(model), h, w]
    out["fixed_input_size"] = not dynamic_size(model)
    out["crop_pct"] = pc.get("crop_pct", eval_crop_pct(max(h, w)))
    if "min_input_size" in pc:  # the smallest image that still gives a token (dynamic_img_size models)
        out["min_input_size"] = list(pc["min_input_size"])
    out["mean"], out["std"] = list(out["mean"]), list(out["std"])
    return out


def describe_preprocessing(d: Mapping) -> str:
    _, h, w = d["input_size"]
    resize = f"resize the shorter side to {int(min(h, w) / d['crop_pct'])} px ({d['interpolation']})"
    return (f"RGB; {resize}; {d['crop_mode']}-crop {h}x{w}; scale to [0, 1]; subtract mean {d['mean']} and divide "
            f"by std {d['std']} per channel; NCHW float32"
            + ("; other sizes run too (dynamic_img_size)" if not d["fixed_input_size"] else ""))


def deploy_metadata(model: nn.Module, name: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                    extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The metadata mapping for an export of `model` (see the module docstring for the keys)."""
    d = data_config(model)
    name = name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") \
        or getattr(model.cfg, "baseline", None)
    meta = {
        "config": model.cfg.to_dict(),
        "num_classes": model.cfg.num_classes,
        "input_name": INPUT_NAME,
        "output_name": output_name(model),
        **d,
        "preprocessing": describe_preprocessing(d),
        "eit_fast_version": __version__,
        "producer": "python -m eit_fast.export",
    }
    if name:
        meta["model"] = name
    if classes is not None:
        if len(classes) != model.cfg.num_classes:
            raise ValueError(f"{len(classes)} class names for a model with {model.cfg.num_classes} outputs")
        meta["classes"] = list(classes)
    out = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    out.update(extra or {})
    return out
