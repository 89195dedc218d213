"""eit_fast::block_mixer: an EIT block's token mixer with the residual add, as torch.library ops.

    out = x + scale[:, None, None] * concat(ConvBranch(y_conv), proj(Attention(qkv)))

x: (B, N, D) residual; y_conv: the first C channels of LayerNorm1(x) (or None); qkv: the qkv Linear's
output (B, N, 3A) (or None), D = C + A; scale: per-sample drop-path scale (B,) fp32; seed: int64 (1,)
tensor for the in-kernel dropout (attention probabilities p_attn, conv branch p_conv, after the
projection p_proj). The forward also returns o (attention before the projection) and lse for the backward.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run them interpreted when TRITON_INTERPRET=1
was set before import, and otherwise the reference math in plain torch (no dropout there: it refuses).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op, wrap_triton

try:
    from eit_fast import kernels as _k
    from eit_fast.kernels import attention as _attn, dropout as _drop, dwconv as _conv, mixer as _mix
    from eit_fast.kernels.attention import MAX_HEAD_DIM
    HAVE_TRITON = True
except ImportError:  # no triton: only the CPU reference path exists
    HAVE_TRITON = False
    MAX_HEAD_DIM = 64

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return HAVE_TRITON and _k.INTERPRET


def _use_kernels(t: Tensor) -> bool:
    if t.device.type == "cuda":
        if not HAVE_TRITON:
            raise RuntimeError("eit_fast::block_mixer on CUDA needs triton, which is not installed")
        return True
    if t.device.type == "cpu":
        return interpreting()
    raise RuntimeError(f"eit_fast::block_mixer runs on CUDA or CPU tensors, got device {t.device}")


def _check(x, y_conv, conv_w, qkv, proj_w, proj_b, scale, seed, grid_h, grid_w, num_heads, ps):
    if x.ndim != 3:
        raise ValueError(f"block_mixer: x must be (B, N, D), got shape {tuple(x.shape)}")
    B, N, D = x.shape
    C = 0 if y_conv is None else y_conv.shape[-1]
    A = 0 if qkv is None else qkv.shape[-1] // 3
    if C + A != D or (qkv is not None and qkv.shape[-1] % 3):
        raise ValueError(f"block_mixer: conv channels {C} + attention channels {A} (qkv width "
                         f"{None if qkv is None else qkv.shape[-1]}) must add up to D = {D}")
    for name, t in (("y_conv", y_conv), ("qkv", qkv)):
        if t is not None and (t.ndim != 3 or t.shape[:2] != (B, N)):
            raise ValueError(f"block_mixer: {name} must be ({B}, {N}, *), got shape {tuple(t.shape)}")
    if C:
        if conv_w is None or tuple(conv_w.shape) != (C, 1, 3, 3):
            raise ValueError(f"block_mixer: conv_w must be ({C}, 1, 3, 3), got "
                             f"{None if conv_w is None else tuple(conv_w.shape)}")
        if N != 1 + grid_h * grid_w:
            raise ValueError(f"block_mixer: N = {N} tokens, but 1 CLS + a {grid_h}x{grid_w} grid is "
                             f"{1 + grid_h * grid_w}")
    if A:
        if num_heads < 1 or A % num_heads:
            raise ValueError(f"block_mixer: {num_heads} heads do not divide {A} attention channels")
        if proj_w is None or tuple(proj_w.shape) != (A, A) or proj_b is None or tuple(proj_b.shape) != (A,):
            raise ValueError(f"block_mixer: proj weight/bias must be ({A}, {A}) and ({A},)")
    if tuple(scale.shape) != (B,) or scale.dtype != torch.float32:
        raise ValueError(f"block_mixer: scale must be float32 of shape ({B},), got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError("block_mixer: seed must be a one-element int64 tensor")
    for name, p in zip(("p_attn", "p_conv", "p_proj"), ps):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"block_mixer: {name} must be in [0, 1), got {p}")
    return B, N, D, C, A


def _no_autocast(device_type: str):
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()  # meta / fake devices have no autocast state


def _no_cpu_dropout(ps):
    if any(p > 0 for p in ps):
        raise NotImplementedError(
            "block_mixer: dropout on the CPU reference path is not supported (its masks come from the "
            "Triton kernels); use the reference model on the CPU, or TRITON_INTERPRET=1 for tests")


# --- reference math (the CPU path, not interpreted) -----------------------------------------------------

def _heads(qkv, H):
    B, N, A3 = qkv.shape
    return qkv.float().reshape(B, N, 3, H, A3 // 3 // H).permute(2, 0, 3, 1, 4).unbind(0)


def _ref_forward(x, y_conv, conv_w, qkv, proj_w, proj_b, scale, gh, gw, H):
    B, N, D = x.shape
    parts = []
    o = x.new_empty(0)
    lse = x.new_empty(0, dtype=torch.float32)
    if y_conv is not None:
        C = y_conv.shape[-1]
        grid = y_conv[:, 1:].float().transpose(1, 2).reshape(B, C, gh, gw)
        conv = F.conv2d(grid, conv_w.float(), padding=1, groups=C).flatten(2).transpose(1, 2)
        parts.append(torch.cat([y_conv[:, :1].float(), conv], 1))
    if qkv is not None:
        q, k, v = _heads(qkv, H)
        s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 * LOG2E)
        lse = torch.logsumexp(s / LOG2E, -1) * LOG2E  # log2 units, as the kernels keep it
        o = (torch.exp2(s - lse[..., None]) @ v).transpose(1, 2).reshape(B, N, -1).to(qkv.dtype)
        parts.append(F.linear(o, proj_w.to(o.dtype), proj_b.to(o.dtype)).float())
    z = torch.cat(parts, -1)
    return (x.float() + scale[:, None, None] * z).to(x.dtype), o, lse


def _ref_attention_backward(qkv, o, do, lse, H):
    B, N, A3 = qkv.shape
    q, k, v = _heads(qkv, H)
    sm = q.shape[-1] ** -0.5
    do = do.float().reshape(B, N, H, -1).transpose(1, 2)
    p = torch.exp2((q @ k.transpose(-2, -1)) * (sm * LOG2E) - lse[..., None])
    dv = p.transpose(-2, -1) @ do
    dp = do @ v.transpose(-2, -1)
    delta = (do * o.float().reshape(B, N, H, -1).transpose(1, 2)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq, dk = ds @ k * sm, ds.transpose(-2, -1) @ q * sm
    return torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(B, N, A3).to(qkv.dtype)


def _ref_conv_backward(gz, y_conv, conv_w, gh, gw):
    B, N, C = gz.shape
    g = gz[:, 1:].float().transpose(1, 2).reshape(B, C, gh, gw)
    y = y_conv[:, 1:].float().transpose(1, 2).reshape(B, C, gh, gw)
    w = conv_w.float()
    dy = torch.nn.grad.conv2d_input(y.shape, w, g, padding=1, groups=C).flatten(2).transpose(1, 2)
    dw = torch.nn.grad.conv2d_weight(y, w.shape, g, padding=1, groups=C)
    return torch.cat([gz[:, :1].float(), dy], 1), dw


# --- the ops --------------------------------------------------------------------------------------------

@triton_op("eit_fast::block_mixer", mutates_args=())
def block_mixer(x: Tensor, y_conv: Optional[Tensor], conv_w: Optional[Tensor], qkv: Optional[Tensor],
                proj_w: Optional[Tensor], proj_b: Optional[Tensor], scale: Tensor, seed: Tensor,
                grid_h: int, grid_w: int, num_heads: int, p_attn: float, p_conv: float,
                p_proj: float) -> tuple[Tensor, Tensor, Tensor]:
    ps = (p_attn, p_conv, p_proj)
    B, N, D, C, A = _check(x, y_conv, conv_w, qkv, proj_w, proj_b, scale, seed, grid_h, grid_w, num_heads, ps)
    if A and A // num_heads > MAX_HEAD_DIM and _use_kernels(x):
        raise ValueError(f"block_mixer: head size {A // num_heads} is over the fused kernels' maximum "
                         f"{MAX_HEAD_DIM}; use the reference block for this layer")
    if not _use_kernels(x):
        _no_cpu_dropout(ps)
        with _no_autocast(x.device.type):  # the op's dtypes are its inputs', as on CUDA
            return _ref_forward(x, y_conv, conv_w, qkv, proj_w, proj_b, scale, grid_h, grid_w, num_heads)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    o = x.new_empty((B, N, A) if A else (0,), dtype=qkv.dtype if A else x.dtype)
    lse = x.new_empty((B, num_heads, N) if A else (0,), dtype=torch.float32)
    _mix.launch_mixer_forward(x, y_conv, None if conv_w is None else conv_w.contiguous(), qkv,
                              None if proj_w is None else proj_w.contiguous(), proj_b, scale, seed, out, o,
                              lse, (grid_h, grid_w), num_heads, p_attn, p_conv, p_proj, wrap=wrap_triton)
    return out, o, lse


@block_mixer.register_fake
def _(x, y_conv, conv_w, qkv, proj_w, proj_b, scale, seed, grid_h, grid_w, num_heads, p_attn, p_conv, p_proj):
    B, N, D = x.shape
    A = 0 if qkv is None else qkv.shape[-1] // 3
    o = x.new_empty((B, N, A) if A else (0,), dtype=qkv.dtype if A else x.dtype)
    lse = x.new_empty((B, num_heads, N) if A else (0,), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), o, lse


@triton_op("eit_fast::block_mixer_backward", mutates_args=())
def block_mixer_backward(g: Tensor, y_conv: Optional[Tensor], conv_w: Optional[Tensor], qkv: Optional[Tensor],
                         proj_w: Optional[Tensor], o: Tensor, lse: Tensor, scale: Tensor, seed: Tensor,
                         grid_h: int, grid_w: int, num_heads: int, p_attn: float, p_conv: float,
                         p_proj: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dy_conv, dconv_w, dqkv, dproj_w, dproj_b); empty tensors for an absent branch."""
    B, N, D = g.shape
    C = 0 if y_conv is None else y_conv.shape[-1]
    A = D - C
    kernels = _use_kernels(g)
    if kernels:
        gz = torch.empty((B, N, D), device=g.device, dtype=g.dtype)
        _mix.launch_mixer_grad(g, scale, seed, gz, C, p_conv, p_proj, wrap=wrap_triton)
    else:
        _no_cpu_dropout((p_attn, p_conv, p_proj))
        gz = g * scale[:, None, None].to(g.dtype)
    dy, dw = g.new_empty(0), g.new_empty(0)  # separate empties: op outputs may not alias
    if C:
        if kernels:
            dy = torch.empty((B, N, C), device=g.device, dtype=y_conv.dtype)
            dw = _conv.launch_conv_backward(gz[..., :C], y_conv, conv_w.contiguous(), dy, (grid_h, grid_w),
                                            wrap=wrap_triton)
        else:
            dy, dw = _ref_conv_backward(gz[..., :C], y_conv, conv_w, grid_h, grid_w)
        dy, dw = dy.to(y_conv.dtype), dw.to(conv_w.dtype)
    dqkv, dpw, dpb = g.new_empty(0), g.new_empty(0), g.new_empty(0)
    if A:
        ga = gz[..., C:].reshape(B * N, A)
        dpb = ga.float().sum(0).to(proj_w.dtype)
        ga = ga.to(o.dtype)
        dpw = (ga.t() @ o.reshape(B * N, A)).to(proj_w.dtype)
        do = (ga @ proj_w.to(o.dtype)).reshape(B, N, A)
        if kernels:
            dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
            _attn.launch_attention_backward(qkv, o, do, lse, seed, dqkv, num_heads, p_attn, wrap=wrap_triton)
        else:
            dqkv = _ref_attention_backward(qkv, o, do, lse, num_heads)
    return dy, dw, dqkv, dpw, dpb


@block_mixer_backward.register_fake
def _(g, y_conv, conv_w, qkv, proj_w, o, lse, scale, seed, grid_h, grid_w, num_heads, p_attn, p_conv, p_proj):
    dy = g.new_empty(0) if y_conv is None else torch.empty_like(y_conv, memory_format=torch.contiguous_format)
    dw = g.new_empty(0) if conv_w is None else torch.empty_like(conv_w)
    dqkv = g.new_empty(0) if qkv is None else torch.empty_like(qkv, memory_format=torch.contiguous_format)
    dpw = g.new_empty(0) if proj_w is None else torch.empty_like(proj_w)
    dpb = g.new_empty(0) if proj_w is None else proj_w.new_empty(proj_w.shape[:1])
    return dy, dw, dqkv, dpw, dpb


def _setup_context(ctx, inputs, output):
    x, y_conv, conv_w, qkv, proj_w, proj_b, scale, seed, gh, gw, heads, pa, pc, pp = inputs
    _, o, lse = output
    ctx.save_for_backward(y_conv, conv_w, qkv, proj_w, o, lse, scale, seed)
    ctx.args = (gh, gw, heads, pa, pc, pp)
    ctx.has = (y_conv is not None, qkv is not None)


def _backward(ctx, g, _go, _glse):
    y_conv, conv_w, qkv, proj_w, o, lse, scale, seed = ctx.saved_tensors
    with _no_autocast(g.device.type):  # a backward called under autocast keeps our dtypes
        dy, dw, dqkv, dpw, dpb = block_mixer_backward(g, y_conv, conv_w, qkv, proj_w, o, lse, scale, seed,
                                                      *ctx.args)
    has_conv, has_attn = ctx.has
    if not has_conv:
        dy = dw = None
    if not has_attn:
        dqkv = dpw = dpb = None
    return g, dy, dw, dqkv, dpw, dpb, None, None, None, None, None, None, None, None


block_mixer.register_autograd(_backward, setup_context=_setup_context)


def dropout_masks(seed: Tensor, batch: int, tokens: int, conv_dim: int, attn_dim: int, num_heads: int,
                  p_attn: float, p_conv: float, p_proj: float) -> dict:
    """The debug switch: the keep masks (bool) a block_mixer call with this seed applies, generated by the
    same in-kernel function, for tests to apply to the reference. Needs the kernels (CUDA or interpreter)."""
    if not _use_kernels(seed):
        raise RuntimeError("dropout_masks needs the Triton kernels: a CUDA seed tensor or TRITON_INTERPRET=1")
    out = {}
    for name, p, stream, shape in (("attn", p_attn, _drop.STREAM_ATTN, (batch, num_heads, tokens, tokens)),
                                   ("conv", p_conv, _drop.STREAM_CONV, (batch, tokens, conv_dim)),
                                   ("proj", p_proj, _drop.STREAM_PROJ, (batch, tokens, attn_dim))):
        if p > 0 and math.prod(shape):
            m = torch.empty(shape, dtype=torch.int8, device=seed.device)
            _drop.launch_keep_mask(m, seed, stream, p)
            out[name] = m.bool()
    return out
