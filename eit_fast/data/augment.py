"""Batch augmentation on the device: random crop with padding, horizontal flip, Mixup/CutMix, label smoothing.

All randomness comes from the generators passed in, so a batch is a pure function of (seed, epoch, batch,
rank): a resumed run sees exactly the batches the uninterrupted one would have.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# ImageNet statistics (DeiT, timm): the authors normalise with these for every data set.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization(device, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) such that x_uint8 * scale + shift is x scaled to [0, 1] and standardised per channel.

    Made once per loader: building them per batch would be a host-to-device copy (and a sync) per step.
    """
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    return (1.0 / (255.0 * std_t)).to(device), (-mean_t / std_t).to(device)


def normalize(x_uint8: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> standardised float32."""
    return torch.addcmul(shift, x_uint8.float(), scale)


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop of the zero-padded image back to its size, and a random horizontal flip."""
    B, C, H, W = x.shape
    dev = x.device
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (B, 1, 1), generator=gen, device=dev)
        ox = torch.randint(0, 2 * padding + 1, (B, 1, 1), generator=gen, device=dev)
        rows = oy + torch.arange(H, device=dev).view(1, H, 1)
        cols = ox + torch.arange(W, device=dev).view(1, 1, W)
        x = padded[torch.arange(B, device=dev).view(B, 1, 1), :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(B, generator=gen, device=dev) < 0.5
        x = torch.where(mask.view(B, 1, 1, 1), x.flip(-1), x)
    return x.contiguous()


def one_hot_smooth(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


@dataclass(frozen=True)
class MixupConfig:
    """timm's Mixup semantics: per batch, with probability `prob`, apply Mixup or CutMix (chosen with
    `switch_prob` when both are on); the partner of sample i is sample B-1-i; targets are smoothed one-hot
    vectors mixed with the same lambda (CutMix's lambda corrected to the box actually pasted)."""
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.0

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def mixup_cutmix(x: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: MixupConfig,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (images, soft targets). Scalars are drawn on the host from `rng`: no device sync."""
    target = one_hot_smooth(labels, num_classes, cfg.smoothing)
    if not cfg.active or rng.random() >= cfg.prob:
        return x, target
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < cfg.switch_prob)
    lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha) if use_cutmix
                else rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
    partner = x.flip(0)
    if use_cutmix:
        H, W = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x = x.clone()
        x[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)
    else:
        x = x * lam + partner * (1.0 - lam)
    return x, target * lam + target.flip(0) * (1.0 - lam)
