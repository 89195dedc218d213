"""AdamW with DeiT's weight-decay rule, and the per-step warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms, biases (every 1-D parameter) and the tokens/embeddings the model names."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
    fused = all(p.is_cuda for p in model.parameters())  # the fused CUDA AdamW; foreach on the CPU
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=True if fused else None)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, lr: float, warmup_lr: float,
                  min_lr: float) -> float:
    """Linear warm-up from warmup_lr to lr, then cosine from lr to min_lr, per optimizer step."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min(step - warmup_steps, span) / span
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def make_scheduler(optimizer, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float):
    """A LambdaLR (its state saves and resumes with the run) following warmup_cosine."""
    base = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, warmup_steps, base, warmup_lr, min_lr) / base)
