"""Non-EIT baselines for the small-data experiment, trainable by `python -m eit_fast.train --model NAME`.

- "resnet18_cifar": torchvision's ResNet-18 adapted to 32 px images as is usual for CIFAR (He et al.'s
  CIFAR variants, and the EIT paper's small-data comparisons): a 3x3 stride-1 stem conv and no max-pool, so
  the four stages see 32, 16, 8 and 4 px maps. Init as torchvision's (kaiming-normal fan_out for every conv).

These take no EIT options and run only as "reference" (plain PyTorch). torchvision is needed only here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn as nn

from ..configs import ConfigError
from ..runtime import ImplError


@dataclass(frozen=True)
class BaselineConfig:
    baseline: str
    img_size: int = 32
    in_chans: int = 3
    num_classes: int = 10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


BASELINES = {"resnet18_cifar": BaselineConfig("resnet18_cifar")}


def is_baseline(name: str) -> bool:
    return name in BASELINES


def baseline_config(name: str, num_classes: int | None = None, **overrides) -> BaselineConfig:
    """The config of baseline `name`; EIT options are refused by name (they do not apply to a ResNet)."""
    cfg = BASELINES[name]
    extra = sorted(k for k in overrides if k not in ("img_size", "in_chans"))
    if extra:
        raise ConfigError(f"{name} is a torchvision baseline: the EIT option(s) {extra} do not apply to it")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if num_classes is not None:
        changes["num_classes"] = num_classes
    return dataclasses.replace(cfg, **changes)


def create_baseline(name: str, impl: str | None = None, num_classes: int | None = None, **overrides) -> nn.Module:
    """Baseline `name` (see BASELINES) as a plain nn.Module with `.cfg` and `.impl` like an EIT's."""
    if impl not in (None, "reference", "auto"):
        raise ImplError(f"{name} has no fused implementation (impl={impl!r}); use impl='reference' or 'auto'")
    cfg = baseline_config(name, num_classes, **overrides)
    try:
        from torchvision.models import resnet18
    except ImportError as e:
        raise ConfigError(f"{name} is torchvision's ResNet-18: pip install torchvision (the same release line "
                          f"as your torch)") from e
    model = resnet18(num_classes=cfg.num_classes)
    model.conv1 = nn.Conv2d(cfg.in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's rule
    model.maxpool = nn.Identity()
    model.cfg, model.impl = cfg, "reference"
    return model
