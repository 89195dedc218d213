"""The reference EIT, in plain PyTorch: the oracle every fused path is tested against.

Module and parameter names follow the authors' code (MrHaiPi/EIT), so their checkpoints load unchanged:
patch_embed.eit_p.conv, cls_token, blocks.{i}.{norm1,attn.qkv,attn.proj,eit_t.conv1,norm2,mlp.fc1,mlp.fc2},
norm, head. The plain-ViT twins reuse the same classes with a patchify stem and all channels to attention.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..configs import ConfigError, EITConfig, pretrained_cfg
from .impulse import impulse_qk
from .init import init_module


class InputError(ValueError):
    """An input tensor the model was not built for."""


class EITPatchProjection(nn.Module):
    """EIT-P: Conv2d(k, stride s, padding k//2, bias) then MaxPool2d(p); no norm, no activation."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, pool: int, *, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel, stride=stride, padding=kernel // 2, bias=True,
                              device=device, dtype=dtype)
        self.pool = nn.MaxPool2d(pool, stride=pool)

    def forward(self, x):
        return self.pool(self.conv(x))


class EITPatchEmbed(nn.Module):
    def __init__(self, cfg: EITConfig, *, device=None, dtype=None):
        super().__init__()
        self.eit_p = EITPatchProjection(cfg.in_chans, cfg.embed_dim, cfg.patch_kernel, cfg.patch_stride, cfg.pool,
                                        device=device, dtype=dtype)
        # Plain ints for grid(): TorchScript hides the conv's kernel_size/stride/padding.
        self.kernel, self.stride, self.pool_size = cfg.patch_kernel, cfg.patch_stride, cfg.pool

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """(Hp, Wp) token grid for an h x w image: the conv/pool arithmetic."""
        k, s, p, pool = self.kernel, self.stride, self.kernel // 2, self.pool_size
        return ((h + 2 * p - k) // s + 1) // pool, ((w + 2 * p - k) // s + 1) // pool

    def forward(self, x):
        return self.eit_p(x).flatten(2).transpose(1, 2)  # (B, Hp*Wp, D), row-major


class ViTPatchEmbed(nn.Module):
    def __init__(self, cfg: EITConfig, *, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size,
                              device=device, dtype=dtype)
        self.patch_size = cfg.patch_size

    def grid(self, h: int, w: int) -> tuple[int, int]:
        return h // self.patch_size, w // self.patch_size

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class LowRank(nn.Module):
    """A low-rank projection: Linear(dim, rank, bias=False) then Linear(rank, dim) (docs/design.md section 1.6)."""

    def __init__(self, dim: int, rank: int, *, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, dim, bias=True, device=device, dtype=dtype)

    def forward(self, x):
        return self.up(self.down(x))


class SplitQKV(nn.Module):
    """qkv as three projections q, k, v (each a full Linear or a LowRank), outputs concatenated as the fused
    Linear(dim, 3 dim) gives them. Used only when a rank is set: the full-rank model keeps the authors' qkv."""

    def __init__(self, dim: int, ranks: tuple[Optional[int], Optional[int], Optional[int]], *, device=None,
                 dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.q, self.k, self.v = (nn.Linear(dim, dim, **dd) if r is None else LowRank(dim, r, **dd) for r in ranks)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (CLS included) on `dim` channels.

    ranks: (q, k, v) ranks of low-rank projections, None for full rank (all None: the authors' fused qkv).
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0, *,
                 ranks: tuple[Optional[int], Optional[int], Optional[int]] = (None, None, None),
                 device=None, dtype=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        if all(r is None for r in ranks):
            self.qkv = nn.Linear(dim, dim * 3, bias=True, device=device, dtype=dtype)
        else:
            self.qkv = SplitQKV(dim, ranks, device=device, dtype=dtype)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=True, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    @torch.jit.ignore
    def attention_map(self, x):
        """softmax(q k^T * scale), (B, heads, N, N): forward's attention probabilities before dropout."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)

    @torch.jit.ignore
    def set_qk(self, wq: torch.Tensor, wk: torch.Tensor):
        """Write (dim, dim) q and k weights (full-rank q and k only) and zero their biases."""
        dim = self.head_dim * self.num_heads
        if isinstance(self.qkv, SplitQKV):
            if not (isinstance(self.qkv.q, nn.Linear) and isinstance(self.qkv.k, nn.Linear)):
                raise ConfigError("set_qk needs full-rank q and k projections")
            targets = [(self.qkv.q.weight, self.qkv.q.bias, wq), (self.qkv.k.weight, self.qkv.k.bias, wk)]
        else:
            w, b = self.qkv.weight, self.qkv.bias
            targets = [(w[:dim], b[:dim], wq), (w[dim:2 * dim], b[dim:2 * dim], wk)]
        with torch.no_grad():
            for weight, bias, src in targets:
                weight.copy_(src.to(device=weight.device, dtype=weight.dtype))
                bias.zero_()


class ConvBranch(nn.Module):
    """EIT-T's depthwise 3x3 conv over the patch-token grid; the CLS tokens' channels pass unchanged."""

    def __init__(self, channels: int, drop: float = 0.0, num_prefix_tokens: int = 1, *, device=None, dtype=None):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False,
                               device=device, dtype=dtype)
        self.drop = nn.Dropout(drop)

    def forward(self, x, grid: tuple[int, int]):
        B, N, C = x.shape
        n = self.num_prefix_tokens
        cls, patches = x[:, :n], x[:, n:]
        patches = patches.transpose(1, 2).reshape(B, C, grid[0], grid[1])
        patches = self.drop(self.conv1(patches)).flatten(2).transpose(1, 2)
        return torch.cat([cls, patches], dim=1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0, *, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)
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

    def __init__(self, cfg: EITConfig, layer: int, drop_path: float, *, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        dim = cfg.embed_dim
        self.attn_dim, self.conv_dim = cfg.split(layer)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        if self.attn_dim:
            ranks = (cfg.rank("q", layer), cfg.rank("k", layer), cfg.rank("v", layer))
            self.attn = Attention(self.attn_dim, cfg.num_heads, cfg.attn_drop_rate, cfg.drop_rate, ranks=ranks,
                                  **dd)
        if self.conv_dim:
            self.eit_t = ConvBranch(self.conv_dim, cfg.attn_drop_rate, cfg.num_cls_tokens, **dd)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, cfg.mlp_hidden, cfg.drop_rate, **dd)

    def mix(self, y, grid: tuple[int, int]):
        # hasattr, not conv_dim/attn_dim: TorchScript resolves it when compiling, so a branch that reads a
        # missing submodule (no eit_t in the last block) is never compiled.
        if not hasattr(self, "eit_t"):
            return self.attn(y)
        if not hasattr(self, "attn"):
            return self.eit_t(y, grid)
        c = self.conv_dim
        return torch.cat([self.eit_t(y[..., :c], grid), self.attn(y[..., c:])], dim=-1)

    def forward(self, x, grid: tuple[int, int]):
        """x: (B, n + Hp*Wp, D) with the n CLS tokens first; grid: (Hp, Wp) of the patch tokens."""
        x = x + self.drop_path(self.mix(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int],
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """A learned positional embedding for another token grid, as timm's resample_abs_pos_embed computes it:
    the prefix (CLS) rows unchanged, the grid rows resized bicubically with antialiasing, in float32."""
    prefix, rows = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    rows = rows.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    rows = F.interpolate(rows, size=new_grid, mode="bicubic", align_corners=False, antialias=True)
    rows = rows.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, rows], dim=1)


def _grid_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], built: tuple[int, int],
                    num_prefix_tokens: int = 1) -> torch.Tensor:
    # Skip the resize at the built size, except while exporting: comparing symbolic sizes would pin them.
    if torch.jit.is_scripting() or not torch.compiler.is_compiling():
        if grid[0] == built[0] and grid[1] == built[1]:
            return pos_embed
    return resample_pos_embed(pos_embed, grid, built, num_prefix_tokens)


torch.fx.wrap("_grid_pos_embed")  # FX: a leaf call, since it branches on the run-time grid


def _tracing(x) -> bool:
    """A tracer or compiler runs (FX, torch.jit.trace, dynamo/export): no eager-only input checks."""
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling()


class EIT(nn.Module):
    """EIT (arXiv 2203.07116), or its plain-ViT twin when cfg.stem == "patch" and cfg.conv_split is False.

    Follows timm's VisionTransformer API: num_features, head_hidden_size, embed_dim, num_prefix_tokens,
    global_pool, feature_info, pretrained_cfg; forward_features / forward_head(pre_logits=...),
    reset_classifier, set_grad_checkpointing, forward_intermediates, prune_intermediate_layers, group_matcher.
    """

    def __init__(self, cfg: EITConfig, *, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.impl = "reference"
        D = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.in_chans = cfg.in_chans
        self.embed_dim = self.num_features = D
        self.head_hidden_size = cfg.pre_logits or cfg.pooled_dim  # what forward_head(pre_logits=True) gives
        self.num_prefix_tokens = cfg.num_cls_tokens
        self.has_class_token = True
        self.img_size = cfg.img_hw
        self.grid_size = cfg.grid_hw
        self.dynamic_img_size = cfg.dynamic_img_size
        self.grad_checkpointing = False
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=D, reduction=cfg.reduction)
                             for i in range(cfg.depth)]
        self.pretrained_cfg = pretrained_cfg(cfg)

        self.patch_embed = EITPatchEmbed(cfg, **dd) if cfg.stem == "eit" else ViTPatchEmbed(cfg, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, cfg.num_cls_tokens, D, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, D, **dd)) if cfg.pos_embed else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear, as DeiT
        self.blocks = nn.ModuleList(Block(cfg, i, rates[i], **dd) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6, **dd)
        if cfg.pre_logits:
            self.pre_logits = nn.Sequential(OrderedDict(fc=nn.Linear(cfg.pooled_dim, cfg.pre_logits, **dd),
                                                        act=nn.Tanh()))
        else:
            self.pre_logits = nn.Identity()
        self.head = self._new_head(cfg.num_classes, **dd)
        self.init_weights()

    def _new_head(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        return nn.Linear(self.head_hidden_size, num_classes, device=device, dtype=dtype) if num_classes \
            else nn.Identity()

    # --- init (cfg.init: eit_fast.models.init; cfg.attn_init: eit_fast.models.impulse) ------------------
    def init_weights(self):
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_module(self, self.cfg.init)
        if self.cfg.attn_init == "impulse" and not self.cls_token.is_meta:
            self.impulse_shifts = self._impulse_init()

    @torch.jit.ignore
    def _impulse_init(self) -> list[list[tuple[int, int]]]:
        """Fit every attention layer's q and k to impulse targets on the built grid; the shifts per layer."""
        shifts = []
        for blk in self.blocks:
            if not blk.attn_dim:
                shifts.append([])
                continue
            wq, wk, s = impulse_qk(self.grid_size, blk.attn_dim, blk.attn.num_heads, self.cfg.impulse_window)
            blk.attn.set_qk(wq, wk)
            shifts.append(s)
        return shifts

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
        H, W = x.shape[2], x.shape[3]
        if not self.dynamic_img_size and (H, W) != self.img_size:
            raise InputError(f"this model was built for {self.img_size[0]}x{self.img_size[1]} images, got "
                             f"{H}x{W}; build it with img_size=({H}, {W}), or with dynamic_img_size=True to "
                             f"take any size")
        if min(self.patch_embed.grid(H, W)) < 1:
            raise InputError(f"a {H}x{W} image is too small for this stem: it gives no patch token "
                             f"(at least {self.pretrained_cfg['min_input_size'][1]} px a side)")
        if not x.is_floating_point():
            raise InputError(f"expected a floating-point image tensor, got dtype {x.dtype}")

    def _pos_embed(self, x, grid: tuple[int, int]):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if self.dynamic_img_size:
                pos = _grid_pos_embed(pos, grid, self.grid_size, self.num_prefix_tokens)
            x = x + pos
        return self.pos_drop(x)

    def forward_features(self, x):
        if not torch.jit.is_scripting():  # TorchScript compiles nothing inside this branch
            if not _tracing(x):
                self.check_input(x)
        grid = self.patch_embed.grid(x.shape[2], x.shape[3])
        x = self._pos_embed(self.patch_embed(x), grid)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":  # the CLS tokens, concatenated
            x = x[:, :self.num_prefix_tokens].flatten(1)
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    # --- timm's model API ------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names the optimiser should not decay: tokens and embeddings (norms/biases go by ndim)."""
        return {"cls_token", "pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups, first to last (layer-wise lr decay): the stem, each block, then the final norm
        (the head and the authors' pre_logits layer fall in the last group)."""
        return dict(stem=r"^cls_token|pos_embed|patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for num_classes (0: none, forward returns pooled features); optionally a new pooling."""
        changes = {"num_classes": num_classes} if global_pool is None else \
            {"num_classes": num_classes, "global_pool": global_pool}
        cfg = self.cfg.replace(**changes)  # validates: a bad value raises ConfigError
        if cfg.pre_logits and cfg.pooled_dim != self.cfg.pooled_dim:
            raise ConfigError(f"global_pool={cfg.global_pool!r} changes the pooled width from "
                              f"{self.cfg.pooled_dim} to {cfg.pooled_dim}, which the pre_logits layer cannot take")
        ref = self.cls_token
        self.head_hidden_size = cfg.pre_logits or cfg.pooled_dim
        self.head = self._new_head(num_classes, device=ref.device, dtype=ref.dtype)
        init_module(self.head, cfg.init)
        self.head.train(self.training)
        self.cfg, self.num_classes, self.global_pool = cfg, cfg.num_classes, cfg.global_pool

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, list[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            output_dict: bool = False,
    ):
        """Block outputs, as timm's VisionTransformer.forward_intermediates returns them.

        indices: the last n blocks (int), the blocks listed (negative counts from the end), or all (None).
        output_fmt "NCHW" gives (B, D, Hp, Wp) maps, "NLC" (B, Hp*Wp, D) tokens; the CLS token is stripped
        (return_prefix_tokens=True pairs each with its (B, 1, D) CLS token). norm applies the final norm.
        Returns (final features, intermediates), the intermediates alone (intermediates_only), or a dict with
        "image_intermediates" (and "image_intermediates_prefix", "image_features") (output_dict).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = take_indices(len(self.blocks), indices)
        if not _tracing(x):
            self.check_input(x)
        B, H, W = x.shape[0], x.shape[2], x.shape[3]
        grid = self.patch_embed.grid(H, W)
        x = self._pos_embed(self.patch_embed(x), grid)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = checkpoint(blk, x, grid, use_reentrant=False) if self.grad_checkpointing else blk(x, grid)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, :self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(B, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last one `indices` needs (and the final norm / the head); returns the
        absolute indices kept. model.cfg still describes the unpruned architecture."""
        take, max_index = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


def take_indices(num_blocks: int, indices: Optional[Union[int, list[int]]]) -> tuple[list[int], int]:
    """timm's feature_take_indices: None -> all, int n -> the last n, a list -> those (negative from the end)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_blocks})")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = []
        for i in indices:
            idx = num_blocks + i if i < 0 else i
            if not 0 <= idx < num_blocks:
                raise ValueError(f"feature index {idx} is out of range (0 to {num_blocks - 1})")
            take.append(idx)
    return take, max(take)
