"""The reference EIT, in plain PyTorch: the oracle every fused path is tested against.

Module and parameter names follow the authors' code (MrHaiPi/EIT), so their checkpoints load unchanged:
patch_embed.eit_p.conv, cls_token, blocks.{i}.{norm1,attn.qkv,attn.proj,eit_t.conv1,norm2,mlp.fc1,mlp.fc2},
norm, head. The plain-ViT twins reuse the same classes with a patchify stem and all channels to attention.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from ..configs import EITConfig


class InputError(ValueError):
    """An input tensor the model was not built for."""


class EITPatchProjection(nn.Module):
    """EIT-P: Conv2d(k, stride s, padding k//2, bias) then MaxPool2d(p); no norm, no activation."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, pool: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel, stride=stride, padding=kernel // 2, bias=True)
        self.pool = nn.MaxPool2d(pool, stride=pool)

    def forward(self, x):
        return self.pool(self.conv(x))


class EITPatchEmbed(nn.Module):
    def __init__(self, cfg: EITConfig):
        super().__init__()
        self.eit_p = EITPatchProjection(cfg.in_chans, cfg.embed_dim, cfg.patch_kernel, cfg.patch_stride, cfg.pool)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """(Hp, Wp) token grid for an h x w image: the conv/pool arithmetic."""
        conv, pool = self.eit_p.conv, self.eit_p.pool.kernel_size
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        return ((h + 2 * p - k) // s + 1) // pool, ((w + 2 * p - k) // s + 1) // pool

    def forward(self, x):
        return self.eit_p(x).flatten(2).transpose(1, 2)  # (B, Hp*Wp, D), row-major


class ViTPatchEmbed(nn.Module):
    def __init__(self, cfg: EITConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        p = self.proj.kernel_size[0]
        return h // p, w // p

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (CLS included) on `dim` channels."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class ConvBranch(nn.Module):
    """EIT-T's depthwise 3x3 conv over the patch-token grid; the CLS token's channels pass unchanged."""

    def __init__(self, channels: int, drop: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.drop = nn.Dropout(drop)

    def forward(self, x, grid: tuple[int, int]):
        B, N, C = x.shape
        cls, patches = x[:, :1], x[:, 1:]
        patches = patches.transpose(1, 2).reshape(B, C, grid[0], grid[1])
        patches = self.drop(self.conv1(patches)).flatten(2).transpose(1, 2)
        return torch.cat([cls, patches], dim=1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self):
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm block; the mixer runs attention and the depthwise conv side by side on a channel split.

    z = concat(ConvBranch(y[..., :c]), Attention(y[..., c:])), y = LayerNorm1(x).
    """

    def __init__(self, cfg: EITConfig, layer: int, drop_path: float):
        super().__init__()
        dim = cfg.embed_dim
        self.attn_dim, self.conv_dim = cfg.split(layer)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if self.attn_dim:
            self.attn = Attention(self.attn_dim, cfg.num_heads, cfg.attn_drop_rate, cfg.drop_rate)
        if self.conv_dim:
            self.eit_t = ConvBranch(self.conv_dim, cfg.attn_drop_rate)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, cfg.mlp_hidden, cfg.drop_rate)

    def mix(self, y, grid: tuple[int, int]):
        c = self.conv_dim
        if not c:
            return self.attn(y)
        if not self.attn_dim:
            return self.eit_t(y, grid)
        return torch.cat([self.eit_t(y[..., :c], grid), self.attn(y[..., c:])], dim=-1)

    def forward(self, x, grid: tuple[int, int]):
        """x: (B, 1 + Hp*Wp, D) with the CLS token first; grid: (Hp, Wp) of the patch tokens."""
        x = x + self.drop_path(self.mix(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class EIT(nn.Module):
    """EIT (arXiv 2203.07116), or its plain-ViT twin when cfg.stem == "patch" and cfg.conv_split is False."""

    def __init__(self, cfg: EITConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        D = cfg.embed_dim
        self.patch_embed = EITPatchEmbed(cfg) if cfg.stem == "eit" else ViTPatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, D)) if cfg.pos_embed else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear, as DeiT
        self.blocks = nn.ModuleList(Block(cfg, i, rates[i]) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        if cfg.pre_logits:
            self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(D, cfg.pre_logits), act=nn.Tanh()))
            head_in = cfg.pre_logits
        else:
            self.pre_logits = nn.Identity()
            head_in = D
        self.head = nn.Linear(head_in, cfg.num_classes)
        self.init_weights()

    # --- init (the authors') -----------------------------------------------------------------------------
    def init_weights(self):
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_module)

    # --- forward ---------------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor):
        cfg = self.cfg
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise InputError(f"expected a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_chans:
            raise InputError(f"expected {cfg.in_chans} input channels, got {x.shape[1]} (input shape "
                             f"{tuple(x.shape)})")
        if tuple(x.shape[2:]) != (cfg.img_size, cfg.img_size):
            raise InputError(f"this model was built for {cfg.img_size}x{cfg.img_size} images, got "
                             f"{x.shape[2]}x{x.shape[3]}; build it with create_model(..., "
                             f"img_size={x.shape[2]}) for another size (square images only)")
        if not x.is_floating_point():
            raise InputError(f"expected a floating-point image tensor, got dtype {x.dtype}")

    def forward_features(self, x):
        self.check_input(x)
        grid = self.patch_embed.grid(x.shape[2], x.shape[3])
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x, grid)
        return self.norm(x)

    def forward_head(self, x):
        return self.head(self.pre_logits(x[:, 0]))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        """Parameter names the optimiser should not decay: tokens and embeddings (norms/biases go by ndim)."""
        return {"cls_token", "pos_embed"}


def _init_module(m: nn.Module):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
