"""Parameter and multiply-accumulate counts, in both conventions of docs/design.md section 1.3.

MACs are counted by torch's FlopCounterMode (FLOPs / 2) on a meta-device model, so nothing is computed.
"authors" is the convention of the EIT README (ptflops): the stem conv, every Linear and the depthwise
convs, without the two attention matmuls (q k^T and attn v). "total" adds those matmuls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .configs import EITConfig
from .models import EIT
from .models.eit import Attention


@dataclass(frozen=True)
class MacCount:
    total: int          # every matmul and conv of a forward pass
    attn_matmul: int    # q k^T and attn v only

    @property
    def authors(self) -> int:
        """The EIT README's convention: everything but the attention matmuls."""
        return self.total - self.attn_matmul


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(cfg: EITConfig, batch: int = 1) -> MacCount:
    with torch.device("meta"):
        model = EIT(cfg).eval()
        x = torch.empty(batch, cfg.in_chans, *cfg.img_hw)
    with FlopCounterMode(display=False) as counter:
        model(x)
    flops = counter.get_flop_counts()
    root = type(model).__name__

    def module_flops(name: str) -> int:
        return sum(flops.get(f"{root}.{name}", {}).values())

    attn = 0
    for name, mod in model.named_modules():
        if isinstance(mod, Attention):  # what the attention module does beyond its two Linears
            attn += module_flops(name) - module_flops(f"{name}.qkv") - module_flops(f"{name}.proj")
    total = counter.get_total_flops()
    return MacCount(total=total // 2, attn_matmul=attn // 2)
