"""The fused EIT block (fast path "block_mixer"): the reference Block with its token mixer and the residual
add run by eit_fast::block_mixer (Triton: LayerNorm1, attention + depthwise conv in one launch, projection GEMM
with the residual in its epilogue). Same parameters and names as the reference Block, so state dicts move unchanged.

Provider interface for eit_fast.runtime / eit_fast.patch: availability(), applies_to(model), swap(model, auto),
unswap(model); AutoFusedBlock is the impl="auto" class (eit_fast.autotune picks per case).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from ..autotune import AutoSelected
from ..models.eit import Block
from ..ops import block_mixer as _op
from ..runtime import Verdict


_cpu_warned = False


def _warn_cpu_once():
    global _cpu_warned
    if not _cpu_warned:
        _cpu_warned = True
        warnings.warn("FusedBlock on the CPU runs the reference block's math (the fused kernels need a CUDA GPU, "
                      "or TRITON_INTERPRET=1 for tests)", stacklevel=3)


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
        """x + drop_path(mix(norm1(x))): the block's first half, the fused part (LayerNorm1 and the qkv GEMM
        included, so the op takes x whole and returns its gradient whole)."""
        rates = self._rates()
        if x.device.type == "cpu" and not _op.interpreting():
            _warn_cpu_once()
            if any(rates):  # the op's CPU path has no dropout masks: take the reference module's
                return x + self.drop_path(self.mix(self.norm1(x), grid))
        B = x.shape[0]
        c, a = self.conv_dim, self.attn_dim
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
        dev = x.device.type
        # The matrix operands' dtype: what the reference's autocast would round them to.
        cd = torch.get_autocast_dtype(dev) if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev) \
            else x.dtype
        attn = self.attn if a else None
        out = _op.block_mixer(x, self.norm1.weight, self.norm1.bias, self.eit_t.conv1.weight if c else None,
                              attn.qkv.weight if a else None, attn.qkv.bias if a else None,
                              attn.proj.weight if a else None, attn.proj.bias if a else None, scale, seed,
                              int(grid[0]), int(grid[1]), attn.num_heads if a else 1, self.norm1.eps, *rates, cd)
        return out[0]

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


def block_unsupported(b: Block) -> str | None:
    """Why the fused mixer cannot compute this block, from the block's own options, or None."""
    if b.conv_dim and getattr(b.eit_t, "num_prefix_tokens", 1) != 1:
        return (f"num_cls_tokens={b.eit_t.num_prefix_tokens} (the fused mixer passes exactly one CLS token "
                f"around the conv branch)")
    if b.attn_dim and type(b.attn.qkv) is not nn.Linear:
        return "low-rank q/k/v projections (the fused mixer reads one fused qkv weight)"
    if b.attn_dim and b.attn.head_dim > _op.MAX_HEAD_DIM:
        return f"head size {b.attn.head_dim} (the fused kernels' maximum is {_op.MAX_HEAD_DIM})"
    return None


def applies_to(model) -> Verdict:
    """The one judge of whether `model`'s blocks can take the fused mixer: from each block's options."""
    blocks = [b for b in getattr(model, "blocks", ()) if isinstance(b, Block)]
    if not blocks:
        return Verdict.absent("the model has no EIT/ViT blocks")
    why = sorted({w for w in map(block_unsupported, blocks) if w})
    return Verdict.cannot("; ".join(why)) if why else Verdict.yes()


class AutoFusedBlock(AutoSelected, FusedBlock):
    """The fused block under impl="auto": each case runs the path eit_fast.autotune measured faster."""

    fast_path = "block_mixer"
    _fused_forward = staticmethod(FusedBlock.forward)
    _reference_forward = staticmethod(Block.forward)

    def case_key(self, args) -> tuple[int, str]:
        x, grid = args[0], args[1]
        heads = self.attn.num_heads if self.attn_dim else 0
        return x.shape[0], (f"tokens={x.shape[1]} grid={tuple(grid)} dim={x.shape[2]} conv={self.conv_dim} "
                            f"attn={self.attn_dim} heads={heads}")

    def cannot_run(self, args) -> str | None:
        if args[0].device.type == "cpu":
            return ("the fused mixer runs on the CPU only interpreted (TRITON_INTERPRET=1), which is never "
                    "faster" if _op.interpreting() else "the fused mixer needs a CUDA GPU")
        return None


def swap(model, auto: bool = False) -> int:
    """Turn each Block of model.blocks into the fused class (the measured variant with auto=True) in place:
    the same module object, so the very same parameters, buffers and hooks. Returns how many changed."""
    cls = AutoFusedBlock if auto else FusedBlock
    n = 0
    for blk in model.blocks:
        if isinstance(blk, Block) and type(blk) is not cls:
            blk.__class__ = cls
            n += 1
    return n


def swapped(model) -> int:
    return sum(isinstance(b, FusedBlock) for b in getattr(model, "blocks", ()))


def unswap(model) -> int:
    """Back to the reference Block class; returns how many changed."""
    n = 0
    for blk in getattr(model, "blocks", ()):
        if isinstance(blk, FusedBlock):
            blk.__class__ = Block
            n += 1
    return n
