"""Weight-init rules of EITConfig.init, applied module by module (tokens and embeddings are the model's).

- "authors" (their code, docs/design.md section 1.2): Linear weights trunc-normal std 0.01, biases 0; every Conv2d
  kaiming-normal fan_out as torch computes it, which ignores groups (the depthwise 3x3 conv of c channels
  starts at std sqrt(2 / (9 c))); biases 0; LayerNorm 1 / 0.
- "timm": Linear weights trunc-normal std 0.02 (timm's ViT), biases 0; Conv2d weights normal with std
  sqrt(2 / fan_out), fan_out = k_h * k_w * out_channels / groups (timm's EfficientNet rule, group-aware: the
  depthwise 3x3 conv starts at std sqrt(2/9) = 0.471; an ungrouped conv gets the same as "authors"); biases 0;
  LayerNorm 1 / 0.
- "torch": each module's own reset_parameters() (PyTorch's defaults: Linear and Conv2d weights and biases
  uniform in +-1/sqrt(fan_in), fan_in counting in_channels / groups; LayerNorm 1 / 0).
Trunc-normal draws are cut at +-2 in absolute value (torch's and timm's default), so in effect not at all.
"""
from __future__ import annotations

import math

import torch.nn as nn


def _rule(linear_std: float, conv_init):
    """Linear trunc-normal(linear_std), conv by conv_init, biases 0, LayerNorm 1/0."""
    def init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=linear_std)
            else:
                conv_init(m)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return init


def _kaiming_fan_out(m: nn.Conv2d):
    nn.init.kaiming_normal_(m.weight, mode="fan_out")  # ignores groups, as the authors' code


def _group_fan_out(m: nn.Conv2d):
    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
    nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))


_authors = _rule(0.01, _kaiming_fan_out)
_timm = _rule(0.02, _group_fan_out)


def _torch(m: nn.Module):
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
        m.reset_parameters()


RULES = {"authors": _authors, "timm": _timm, "torch": _torch}


def init_module(m: nn.Module, rule: str):
    """Initialise `m` and its children by `rule` (one of RULES)."""
    m.apply(RULES[rule])
