"""The fused EIT block (fast path "block_mixer"): the reference Block with its token mixer and the residual
add run by eit_fast::block_mixer (Triton: attention + depthwise conv in one launch, projection GEMM with the
residual in its epilogue). Same parameters and names as the reference Block, so state dicts move unchanged.

Provider interface for eit_fast.runtime / eit_fast.patch: availability(), applies_to(model), swap(model).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..models.eit import Block
from ..ops import block_mixer as _op


class FusedBlock(Block):
    """Block whose `x + drop_path(mix(norm1(x)))` is one fused op. Set `debug_masks = True` to keep the last
    call's dropout seed, so `dropout_masks()` can return the masks it applied (for tests)."""

    debug_masks = False

    def _rates(self):
        if not self.training:
            return 0.0, 0.0, 0.0
        return (self.attn.attn_drop.p if self.attn_dim else 0.0, self.eit_t.drop.p if self.conv_dim else 0.0,
                self.attn.proj_drop.p if self.attn_dim else 0.0)

    def forward(self, x, grid: tuple[int, int]):
        out = self.mix_residual(x, grid)
        return out + self.drop_path(self.mlp(self.norm2(out)))

    def mix_residual(self, x, grid: tuple[int, int]):
        """x + drop_path(mix(norm1(x))): the block's first half, the fused part."""
        rates = self._rates()
        if any(rates) and x.device.type == "cpu" and not _op.interpreting():
            # The op's CPU path is the reference math without dropout masks: take the reference module's.
            return x + self.drop_path(self.mix(self.norm1(x), grid))
        B = x.shape[0]
        y = self.norm1(x)
        c, a = self.conv_dim, self.attn_dim
        qkv = self.attn.qkv(y[..., c:]) if a else None
        if self.training and self.drop_path.p > 0:  # the reference DropPath's draw, per sample
            keep = 1.0 - self.drop_path.p
            scale = x.new_empty((B, 1, 1), dtype=torch.float32).bernoulli_(keep).div_(keep).reshape(B)
        else:
            scale = torch.ones(B, device=x.device, dtype=torch.float32)
        if any(rates):
            seed = torch.randint(0, 2 ** 31 - 1, (1,), device=x.device, dtype=torch.int64)
        else:
            seed = torch.zeros(1, device=x.device, dtype=torch.int64)
        if self.debug_masks:
            self.last_dropout = dict(seed=seed, batch=B, tokens=x.shape[1], rates=rates)
        proj_w = self.attn.proj.weight.to(qkv.dtype) if a else None
        out, _, _ = _op.block_mixer(x, y[..., :c] if c else None, self.eit_t.conv1.weight if c else None, qkv,
                                    proj_w, self.attn.proj.bias if a else None, scale, seed, int(grid[0]),
                                    int(grid[1]), self.attn.num_heads if a else 1, *rates)
        return out

    def dropout_masks(self) -> dict:
        """Keep masks of the last forward (needs debug_masks = True): attn (B, H, N, N), conv (B, N, C),
        proj (B, N, A), each present when its rate was > 0."""
        d = self.last_dropout
        return _op.dropout_masks(d["seed"], d["batch"], d["tokens"], self.conv_dim, self.attn_dim,
                                 self.attn.num_heads if self.attn_dim else 1, *d["rates"])


def availability() -> tuple[bool, str]:
    if not _op.HAVE_TRITON:
        return False, "triton is not installed"
    if _op.interpreting():
        return True, "interpreted (TRITON_INTERPRET=1): correct but slow, for tests"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False, ("TRITON_INTERPRET=1 was set after eit_fast.kernels was imported; set it before "
                       "importing eit_fast")
    if not torch.cuda.is_available():
        return False, "no CUDA GPU (TRITON_INTERPRET=1 runs the kernels interpreted on the CPU, for tests)"
    return True, f"Triton on {torch.cuda.get_device_name()}"


def applies_to(model) -> str | None:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not any(isinstance(b, Block) for b in blocks):
        return "the model has no EIT/ViT blocks"
    unsupported = getattr(model, "fused_unsupported", None)
    why = unsupported().get("block_mixer") if callable(unsupported) else None
    if why:
        return why
    for b in blocks:
        if isinstance(b, Block) and b.conv_dim and getattr(b.eit_t, "num_prefix_tokens", 1) != 1:
            return "several CLS tokens (the fused mixer passes exactly one CLS token around the conv branch)"
        if isinstance(b, Block) and b.attn_dim and type(b.attn.qkv) is not nn.Linear:
            return "low-rank q/k/v projections (the fused mixer reads one fused qkv weight)"
    big = [b.attn.head_dim for b in blocks if isinstance(b, Block) and b.attn_dim
           and b.attn.head_dim > _op.MAX_HEAD_DIM]
    if big:
        return f"head size {max(big)} is over the fused kernels' maximum {_op.MAX_HEAD_DIM}"
    return None


def swap(model) -> int:
    """Turn each reference Block of model.blocks into a FusedBlock in place: the same module object, so the
    very same parameters, buffers and hooks; FusedBlock adds no state, only its forward."""
    n = 0
    for blk in model.blocks:
        if type(blk) is Block:
            blk.__class__ = FusedBlock
            n += 1
    return n
