"""Exponential moving average of the weights, with timm's warm-up of the decay.

The decay at step t is min(decay, (1 + t) / (10 + t)), so a short run's EMA is not dominated by the
initial weights. The step comes from the trainer as a Python int: updating never syncs with the device.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int):
        ema = list(self.module.state_dict().values())
        cur = list(model.state_dict().values())
        floats = [(e, c) for e, c in zip(ema, cur) if e.is_floating_point()]
        torch._foreach_lerp_([e for e, _ in floats], [c for _, c in floats], 1.0 - self.decay_at(step))
