"""eit_fast::block_mixer: the first half of an EIT block, x + scale * mix(LayerNorm1(x)), as torch.library ops.

    y = LayerNorm(x; norm_w, norm_b, eps)
    out = x + scale[:, None, None] * concat(ConvBranch(y[..., :C]; conv_w), proj(Attention(qkv(y[..., C:]))))

x: (B, N, D) residual; conv_w (C, 1, 3, 3) or None; qkv_w (3A, A), qkv_b (3A,), proj_w (A, A), proj_b (A,)
or None, D = C + A; scale: per-sample drop-path scale (B,) fp32; seed: int64 (1,) tensor for the in-kernel
dropout (attention probabilities p_attn, conv branch p_conv, after the projection p_proj); compute_dtype:
the dtype of the matrix operands (the autocast dtype under autocast, else x's), as the reference's autocast
would round them. The op takes LayerNorm1's input whole and returns its gradient whole (residual included),
so no slice of a (B, N, D) tensor is zero-filled or accumulated by autograd.

Inside (docs/design.md section 3): LayerNorm writes the two branch operands once in the compute dtype; the qkv
GEMM runs on a copy of qkv_w padded with zero rows so every head is HP = head size rounded up to 8 wide in
memory (16-byte rows: vector loads in the attention and projection kernels, for any head size); one launch
runs the attention and conv tiles, one the projection GEMM with the residual epilogue. Backward: one kernel
makes both branches' output gradients in the compute dtype and the projection's bias gradient; conv backward;
the projection's GEMMs; one attention kernel per (batch, head) for dQ, dK, dV (exponentials once, no atomics);
the qkv GEMMs; LayerNorm backward plus residual in one pass. Every reduction has a fixed order: two runs with
the same tile configs give bitwise-identical gradients.

Tile configs are chosen per GPU architecture, sequence-length bucket and padded head size by measuring each
candidate once (eit_fast.autotune's choice book: cached, the same on every rank, recorded in checkpoints);
under the interpreter, while tracing or capturing a CUDA graph, the cached choice or the first candidate.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run them interpreted when TRITON_INTERPRET=1
was set before import, and otherwise the same math in plain torch (no dropout there: it refuses).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op, wrap_triton

from eit_fast import autotune

# Only a missing triton means "no kernels": an error inside eit_fast.kernels is raised as what it is.
HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON:
    from eit_fast import kernels as _k
    from eit_fast.kernels import attention as _attn, dropout as _drop, dwconv as _conv, layernorm as _ln
    from eit_fast.kernels import mixer as _mix

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 40
"""The largest head size the fused kernels take: padded widths up to 40 are the ones compiled and checked
(tests/test_block_mixer_aot.py); EIT's head sizes are 2..33."""
CONV_TILE = (16, 64)  # (tokens, channels) per conv program


def head_pad(head_dim: int) -> int:
    """The head size in memory: rounded up to a multiple of 8 (16-byte rows in 16-bit types)."""
    return -(-head_dim // 8) * 8


def interpreting() -> bool:
    return HAVE_TRITON and _k.INTERPRET


def _wrap(kernel):
    """wrap_triton(kernel), which lets torch.compile trace the launch. In eager mode under the interpreter the
    kernel is launched as it is: torch before 2.12 refuses the interpreter's functions, and an eager
    wrap_triton launch is the plain launch anyway."""
    if interpreting() and not torch.compiler.is_compiling():
        return kernel
    return wrap_triton(kernel)


def _use_kernels(t: Tensor) -> bool:
    if t.device.type == "cuda":
        if not HAVE_TRITON:
            raise RuntimeError("eit_fast::block_mixer on CUDA needs triton, which is not installed")
        return True
    if t.device.type == "cpu":
        return interpreting()
    raise RuntimeError(f"eit_fast::block_mixer runs on CUDA or CPU tensors, got device {t.device}")


# --- tile configs ---------------------------------------------------------------------------------------
# The candidates each kernel is compiled and checked for (tests/test_block_mixer_aot.py: no warp replication,
# no spills, wgmma on sm_90, shared memory within 99 KB for sm_86/sm_89). The first is the interpreter's.

def _cfg(**kw):
    return dict(kw)


def config_name(cfg: dict) -> str:
    """A config's name in the choice book, e.g. "m64n64w4s2" ("k32" for the projection's K tile)."""
    return (f"m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}" + (f"k{cfg['BLOCK_K']}" if "BLOCK_K" in cfg else "")
            + f"w{cfg['num_warps']}s{cfg['num_stages']}")


def configs(kind: str, dtype: torch.dtype, seq_len: int, hp: int, dropout: bool = False) -> list[dict]:
    """Candidate tiles of `kind` ("attn_fwd", "attn_bwd", "proj") for this dtype, sequence length, padded
    head size and attention dropout. 16-bit tiles put 16 rows per warp along M, the tile's M extent being
    16 x num_warps or more."""
    wide = hp > 32  # BLOCK_D 64: the backward's accumulators need every register without pipelining
    if dtype == torch.float32:  # IEEE fp32 on FMAs: small tiles
        # backward: ptxas caps 4-warp programs near 128 registers, so 64-wide heads take 16-row query tiles and
        # the dropout gains (32 keys per bit word) take 8 warps; both compile without spills on sm_80..sm_90
        bwd = _cfg(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1) if wide else \
            _cfg(BLOCK_M=32, BLOCK_N=32, num_warps=8 if dropout else 4, num_stages=1)
        return {"attn_fwd": [_cfg(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)],
                "attn_bwd": [bwd],
                "proj": [_cfg(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=1)]}[kind]
    if kind == "attn_fwd" and dropout:  # the generator's registers: 64 x 32 score tiles
        return [_cfg(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
                _cfg(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)]
    if kind == "attn_fwd":
        return [_cfg(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
                _cfg(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
                _cfg(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
                _cfg(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)]
    if kind == "attn_bwd":  # BLOCK_M 128 (all 65 queries of eit_cifar in one slab) spills: not shipped
        return [_cfg(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1 if wide else 2)] + \
            ([] if wide else [_cfg(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)])
    if kind == "proj":  # the epilogue's fp32 residual pointers: 32 elements per thread at most
        return [_cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
                _cfg(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
                _cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)]
    raise KeyError(kind)


def _seq_bucket(n: int) -> int:
    return max(64, 1 << (n - 1).bit_length())


def _can_measure(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return (t.device.type == "cuda" and not is_fake(t) and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def _choose(kind: str, t: Tensor, dtype: torch.dtype, seq_len: int, hp: int, dropout: bool, measure) -> dict:
    """One judge for the tiles: the shared choice book, keyed on architecture, length bucket, padded head size
    (and dtype, attention dropout)."""
    options = configs(kind, dtype, seq_len, hp, dropout)
    if interpreting() or len(options) == 1:
        return options[0]
    arch = "sm_%d%d" % torch.cuda.get_device_capability(t.device) if t.device.type == "cuda" and \
        torch.cuda.is_available() else "any"
    key = f"{arch}/n{_seq_bucket(seq_len)}/hp{hp}/{str(dtype).removeprefix('torch.')}" + ("/drop" if dropout else "")
    by_name = {config_name(c): c for c in options}
    timed = (lambda name: measure(by_name[name])) if _can_measure(t) else None
    return by_name[autotune.pick(f"block_mixer.{kind}", key, list(by_name), timed)]


def _timer(device):
    from eit_fast.timing import time_one
    return lambda fn: time_one(fn, device, warmup=1, iters=5, measure_memory=False).median_s


# --- the padded weights ---------------------------------------------------------------------------------

def pad_qkv(w: Tensor, b: Tensor, heads: int, hp: int, ap: int) -> tuple[Tensor, Tensor]:
    """(3A, A) weight and (3A,) bias -> (3*H*HP, AP) and (3*H*HP,): each head's rows padded to HP with zero
    rows, the input columns to AP with zero columns. The GEMM's output is then (M, 3, H, HP)."""
    a = w.shape[1]
    hd = a // heads
    wp = F.pad(w.reshape(3, heads, hd, a), (0, ap - a, 0, hp - hd)).reshape(3 * heads * hp, ap)
    bp = F.pad(b.reshape(3, heads, hd), (0, hp - hd)).reshape(3 * heads * hp)
    return wp, bp


def unpad_qkv(dw: Tensor, db: Tensor, heads: int, hd: int, a: int) -> tuple[Tensor, Tensor]:
    hp, ap = dw.shape[0] // (3 * heads), dw.shape[1]
    return (dw.reshape(3, heads, hp, ap)[:, :, :hd, :a].reshape(3 * a, a),
            db.reshape(3, heads, hp)[:, :, :hd].reshape(3 * a))


def pad_proj(w: Tensor, heads: int, hp: int) -> Tensor:
    """(A, A) -> (A, H*HP): zero input columns where o's heads are padded."""
    a = w.shape[0]
    return F.pad(w.reshape(a, heads, a // heads), (0, hp - a // heads)).reshape(a, heads * hp)


def unpad_proj(dw: Tensor, heads: int, hd: int) -> Tensor:
    a = dw.shape[0]
    return dw.reshape(a, heads, -1)[:, :, :hd].reshape(a, a)


# --- checks ---------------------------------------------------------------------------------------------

def _dims(x, conv_w, qkv_w, num_heads):
    B, N, D = x.shape
    C = 0 if conv_w is None else conv_w.shape[0]
    A = D - C
    H = num_heads if A else 1
    HD = A // H if A else 0
    return B, N, D, C, A, H, HD, head_pad(HD) if A else 0, head_pad(A) if A else 0, head_pad(C)


def _check(x, norm_w, norm_b, conv_w, qkv_w, qkv_b, proj_w, proj_b, scale, seed, grid_h, grid_w, num_heads,
           ps, compute_dtype):
    if x.ndim != 3:
        raise ValueError(f"block_mixer: x must be (B, N, D), got shape {tuple(x.shape)}")
    B, N, D = x.shape
    for name, t in (("norm_w", norm_w), ("norm_b", norm_b)):
        if tuple(t.shape) != (D,):
            raise ValueError(f"block_mixer: {name} must be ({D},), got {tuple(t.shape)}")
    C = 0 if conv_w is None else conv_w.shape[0]
    A = 0 if qkv_w is None else qkv_w.shape[1]
    if C + A != D:
        raise ValueError(f"block_mixer: conv channels {C} + attention channels {A} must add up to D = {D}")
    if C:
        if tuple(conv_w.shape) != (C, 1, 3, 3):
            raise ValueError(f"block_mixer: conv_w must be ({C}, 1, 3, 3), got {tuple(conv_w.shape)}")
        if N != 1 + grid_h * grid_w:
            raise ValueError(f"block_mixer: N = {N} tokens, but 1 CLS + a {grid_h}x{grid_w} grid is "
                             f"{1 + grid_h * grid_w}")
    if A:
        if num_heads < 1 or A % num_heads:
            raise ValueError(f"block_mixer: {num_heads} heads do not divide {A} attention channels")
        if tuple(qkv_w.shape) != (3 * A, A) or qkv_b is None or tuple(qkv_b.shape) != (3 * A,):
            raise ValueError(f"block_mixer: qkv weight/bias must be ({3 * A}, {A}) and ({3 * A},)")
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
    if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"block_mixer: compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
    if A and _use_kernels(x):
        if A // num_heads > MAX_HEAD_DIM:
            raise ValueError(f"block_mixer: head size {A // num_heads} is over the fused kernels' maximum "
                             f"{MAX_HEAD_DIM}; use the reference block for this layer")
        if N * 3 * num_heads * head_pad(A // num_heads) >= 2 ** 31:
            raise ValueError(f"block_mixer: {N} tokens x {num_heads} heads is too large for the kernels' 32-bit "
                             f"offsets inside one batch element; use the reference block for this layer")


def _no_autocast(device_type: str):
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()  # meta / fake devices have no autocast state


def _no_cpu_dropout(ps):
    if any(p > 0 for p in ps):
        raise NotImplementedError(
            "block_mixer: dropout on the CPU reference path is not supported (its masks come from the "
            "Triton kernels); use the reference model on the CPU, or TRITON_INTERPRET=1 for tests")


def _empty_saved(x, dims, cd, p_attn, with_qkv=True):
    """The op's saved tensors, unwritten: y_conv (M, CP), y_attn (M, AP), mean, rstd (M,), qkv (B, N, 3, H, HP),
    o (B, N, H, HP), lse (B, H, N), the attention dropout's keep bits (B*H, N, ceil(N/32)) int32; empty (0,)
    where a branch (or the dropout) is absent."""
    B, N, D, C, A, H, HD, HP, AP, CP = dims
    M = B * N
    e = lambda *s, dtype=cd: x.new_empty(s, dtype=dtype)
    return (e(M, CP) if C else e(0), e(M, AP) if A else e(0), e(M, dtype=torch.float32), e(M, dtype=torch.float32),
            e(B, N, 3, H, HP) if A and with_qkv else e(0), e(B, N, H, HP) if A else e(0),
            e(B, H, N, dtype=torch.float32) if A else e(0, dtype=torch.float32),
            e(*_attn.bits_shape(B, H, N), dtype=torch.int32) if A and p_attn > 0 else e(0, dtype=torch.int32))


# --- the same math in plain torch (the CPU path, not interpreted) ----------------------------------------

def _ref_forward(x, norm_w, norm_b, conv_w, qkv_w, qkv_b, proj_w, proj_b, scale, gh, gw, dims, eps, cd):
    B, N, D, C, A, H, HD, HP, AP, CP = dims
    M = B * N
    xf = x.float().reshape(M, D)
    mean = xf.mean(-1)
    rstd = torch.rsqrt((xf - mean[:, None]).square().mean(-1) + eps)
    y = (xf - mean[:, None]) * rstd[:, None] * norm_w.float() + norm_b.float()
    y_conv, y_attn, _, _, qkv, o, lse, bits = _empty_saved(x, dims, cd, 0.0)
    parts = []
    if C:
        y_conv = F.pad(y[:, :C], (0, CP - C)).to(cd)
        yc = y_conv[:, :C].float().reshape(B, N, C)
        grid = yc[:, 1:].transpose(1, 2).reshape(B, C, gh, gw)
        conv = F.conv2d(grid, conv_w.to(cd).float(), padding=1, groups=C).flatten(2).transpose(1, 2)
        parts.append(torch.cat([yc[:, :1], conv], 1))
    if A:
        y_attn = F.pad(y[:, C:], (0, AP - A)).to(cd)
        wq, bq = pad_qkv(qkv_w, qkv_b, H, HP, AP)
        qkv = F.linear(y_attn, wq.to(cd), bq.to(cd)).reshape(B, N, 3, H, HP)
        q, k, v = qkv.float().permute(2, 0, 3, 1, 4).unbind(0)
        s = (q @ k.transpose(-2, -1)) * (HD ** -0.5 * LOG2E)
        lse = torch.logsumexp(s / LOG2E, -1) * LOG2E  # log2 units, as the kernels keep it
        o = (torch.exp2(s - lse[..., None]) @ v).transpose(1, 2).to(cd).contiguous()
        proj = F.linear(o.reshape(M, H * HP).float(), pad_proj(proj_w, H, HP).to(cd).float()) + proj_b.float()
        parts.append(proj.reshape(B, N, A))
    z = torch.cat(parts, -1)
    out = (x.float() + scale[:, None, None] * z).to(x.dtype)
    return out, y_conv, y_attn, mean, rstd, qkv, o, lse, bits


def _ref_attention_backward(qkv, o, do, lse, hd):
    B, N, _, H, HP = qkv.shape
    q, k, v = qkv.float().permute(2, 0, 3, 1, 4).unbind(0)
    sm = hd ** -0.5
    do = do.float().transpose(1, 2)
    p = torch.exp2((q @ k.transpose(-2, -1)) * (sm * LOG2E) - lse[..., None])
    dv = p.transpose(-2, -1) @ do
    dp = do @ v.transpose(-2, -1)
    delta = (do * o.float().transpose(1, 2)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq, dk = ds @ k * sm, ds.transpose(-2, -1) @ q * sm
    return torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).to(qkv.dtype).contiguous()


def _ref_conv_backward(gz, y_conv, conv_w, gh, gw):
    B, N, C = gz.shape
    g = gz[:, 1:].float().transpose(1, 2).reshape(B, C, gh, gw)
    y = y_conv[:, 1:].float().transpose(1, 2).reshape(B, C, gh, gw)
    w = conv_w.float()
    dy = torch.nn.grad.conv2d_input(y.shape, w, g, padding=1, groups=C).flatten(2).transpose(1, 2)
    dw = torch.nn.grad.conv2d_weight(y, w.shape, g, padding=1, groups=C)
    return torch.cat([gz[:, :1].float(), dy], 1), dw


def _ref_layernorm_backward(x, norm_w, mean, rstd, dy, g):
    M = mean.shape[0]
    D = x.shape[-1]
    xhat = (x.float().reshape(M, D) - mean[:, None]) * rstd[:, None]
    wdy = dy * norm_w.float()
    dx = g.float().reshape(M, D) + rstd[:, None] * (wdy - xhat * (xhat * wdy).mean(-1, keepdim=True)
                                                    - wdy.mean(-1, keepdim=True))
    return dx.reshape(x.shape).to(x.dtype), (dy * xhat).sum(0), dy.sum(0)


# --- the ops --------------------------------------------------------------------------------------------

def forward_impl(x, norm_w, norm_b, conv_w, qkv_w, qkv_b, proj_w, proj_b, scale, seed, grid_h, grid_w, num_heads,
                 eps, p_attn, p_conv, p_proj, compute_dtype):
    """The forward op's body (also called directly by the AOT tests, which record its launches)."""
    ps = (p_attn, p_conv, p_proj)
    _check(x, norm_w, norm_b, conv_w, qkv_w, qkv_b, proj_w, proj_b, scale, seed, grid_h, grid_w, num_heads, ps,
           compute_dtype)
    dims = _dims(x, conv_w, qkv_w, num_heads)
    B, N, D, C, A, H, HD, HP, AP, CP = dims
    cd = compute_dtype
    if not _use_kernels(x):
        _no_cpu_dropout(ps)
        with _no_autocast(x.device.type):  # the op's dtypes are its arguments', as on CUDA
            return _ref_forward(x, norm_w, norm_b, conv_w, qkv_w, qkv_b, proj_w, proj_b, scale, grid_h, grid_w,
                                dims, eps, cd)
    y_conv, y_attn, mean, rstd, qkv, o, lse, bits = _empty_saved(x, dims, cd, p_attn, with_qkv=False)
    _ln.launch_layernorm_forward(x, norm_w, norm_b, y_conv if C else None, y_attn if A else None, mean, rstd, C,
                                 eps, wrap=_wrap)
    dot_opts = _attn.dot_options(cd)
    if A:
        wq, bq = pad_qkv(qkv_w, qkv_b, H, HP, AP)
        qkv = torch.addmm(bq.to(cd), y_attn, wq.to(cd).t()).view(B, N, 3, H, HP)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    args = (x, y_conv if C else None, _conv.tap_major(conv_w.to(cd), CP) if C else None, qkv if A else None)

    def fwd(cfg, dest=(out, o, lse, bits)):
        _mix.launch_mixer_forward(*args, dest[1], dest[2], dest[3], scale, seed, dest[0], C, (grid_h, grid_w),
                                  max(HD, 1), p_attn, p_conv, cfg, CONV_TILE, dot_opts, wrap=_wrap)

    def measure_fwd(cfg):
        dest = tuple(torch.empty_like(t) for t in (out, o, lse, bits))
        return _timer(x.device)(lambda: fwd(cfg, dest))

    fwd(_choose("attn_fwd", x, cd, N, HP, p_attn > 0, measure_fwd) if A else configs("attn_fwd", cd, N, 8)[0])
    if A:
        wp = pad_proj(proj_w, H, HP).to(cd).contiguous()

        def proj(cfg, dest=out):
            _mix.launch_projection(o, wp, proj_b, x, scale, seed, dest, p_proj, cfg, dot_opts, wrap=_wrap)

        proj(_choose("proj", x, cd, N, HP, p_attn > 0,
                     lambda cfg: _timer(x.device)(lambda: proj(cfg, torch.empty_like(out)))))
    return out, y_conv, y_attn, mean, rstd, qkv, o, lse, bits


@triton_op("eit_fast::block_mixer", mutates_args=())
def block_mixer(x: Tensor, norm_w: Tensor, norm_b: Tensor, conv_w: Optional[Tensor], qkv_w: Optional[Tensor],
                qkv_b: Optional[Tensor], proj_w: Optional[Tensor], proj_b: Optional[Tensor], scale: Tensor,
                seed: Tensor, grid_h: int, grid_w: int, num_heads: int, eps: float, p_attn: float, p_conv: float,
                p_proj: float, compute_dtype: torch.dtype
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, and for the backward: y_conv, y_attn, mean, rstd, qkv, o, lse, dropout keep bits)."""
    return forward_impl(x, norm_w, norm_b, conv_w, qkv_w, qkv_b, proj_w, proj_b, scale, seed, grid_h, grid_w,
                        num_heads, eps, p_attn, p_conv, p_proj, compute_dtype)


@block_mixer.register_fake
def _(x, norm_w, norm_b, conv_w, qkv_w, qkv_b, proj_w, proj_b, scale, seed, grid_h, grid_w, num_heads, eps,
      p_attn, p_conv, p_proj, compute_dtype):
    dims = _dims(x, conv_w, qkv_w, num_heads)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), *_empty_saved(x, dims, compute_dtype, p_attn))


def backward_impl(g, x, norm_w, conv_w, qkv_w, proj_w, y_conv, y_attn, mean, rstd, qkv, o, lse, bits, scale, seed,
                  grid_h, grid_w, num_heads, p_attn, p_conv, p_proj, compute_dtype):
    """The backward op's body (also called directly by the AOT tests)."""
    dims = _dims(x, conv_w, qkv_w, num_heads)
    B, N, D, C, A, H, HD, HP, AP, CP = dims
    M = B * N
    cd = compute_dtype
    kernels = _use_kernels(g)
    e = lambda: g.new_empty(0)  # separate empties: op outputs may not alias
    dconv_w, dqkv_w, dqkv_b, dproj_w, dproj_b = e(), e(), e(), e(), e()
    dy_conv = dy_attn = None
    if kernels:
        gz_conv = g.new_empty((M, CP), dtype=cd) if C else None
        ga = g.new_empty((M, A), dtype=cd) if A else None
        dpb = _mix.launch_mixer_grad(g, scale, seed, gz_conv, ga, C, p_conv, p_proj, wrap=_wrap)
    else:
        _no_cpu_dropout((p_attn, p_conv, p_proj))
        gz = g.float() * scale[:, None, None]
        gz_conv = gz[..., :C].reshape(M, C).to(cd) if C else None  # (M, C): the plain-torch path is unpadded
        dpb = gz[..., C:].reshape(M, A).sum(0) if A else None
        ga = gz[..., C:].reshape(M, A).to(cd) if A else None
    if C:
        if kernels:
            dy_conv = g.new_empty((M, CP), dtype=cd)
            dw = _conv.launch_conv_backward(gz_conv.view(B, N, CP), y_conv.view(B, N, CP),
                                            _conv.tap_major(conv_w.to(cd), CP), dy_conv.view(B, N, CP), C,
                                            (grid_h, grid_w), wrap=_wrap)
        else:
            dy, dw = _ref_conv_backward(gz_conv.view(B, N, C), y_conv[:, :C].reshape(B, N, C), conv_w.to(cd), grid_h,
                                        grid_w)
            dy_conv = dy.reshape(M, C).to(cd)
        dconv_w = dw.to(conv_w.dtype)
    if A:
        dproj_b = dpb.to(proj_w.dtype)
        wp = pad_proj(proj_w, H, HP).to(cd)
        dproj_w = unpad_proj(ga.t() @ o.reshape(M, H * HP), H, HD).to(proj_w.dtype)
        do = (ga @ wp).view(B, N, H, HP)
        if kernels:
            dqkv = torch.empty_like(qkv)

            def bwd(cfg, dest=dqkv):
                return _attn.launch_attention_backward(qkv, o, do, lse, bits if p_attn > 0 else lse, dest, HD,
                                                       p_attn, cfg, wrap=_wrap)

            dbq = bwd(_choose("attn_bwd", g, cd, N, HP, p_attn > 0,
                              lambda cfg: _timer(g.device)(lambda: bwd(cfg, torch.empty_like(dqkv)))))
        else:
            dqkv = _ref_attention_backward(qkv, o, do, lse, HD)
            dbq = dqkv.view(M, 3 * H * HP).sum(0, dtype=torch.float32)
        d2 = dqkv.view(M, 3 * H * HP)
        wq, _ = pad_qkv(qkv_w, qkv_w.new_zeros(3 * A), H, HP, AP)
        dqkv_w, dqkv_b = unpad_qkv(d2.t() @ y_attn, dbq.reshape(-1), H, HD, A)
        dqkv_w, dqkv_b = dqkv_w.to(qkv_w.dtype), dqkv_b.to(qkv_w.dtype)
        dy_attn = d2 @ wq.to(cd)
    if kernels:
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dnw, dnb = _ln.launch_layernorm_backward(x, norm_w, mean, rstd, dy_conv, dy_attn, g, dx, C, wrap=_wrap)
    else:
        parts = ([dy_conv.float()] if C else []) + ([dy_attn[:, :A].float()] if A else [])
        dx, dnw, dnb = _ref_layernorm_backward(x, norm_w, mean, rstd, torch.cat(parts, -1), g)
    return dx, dnw.to(norm_w.dtype), dnb.to(norm_w.dtype), dconv_w, dqkv_w, dqkv_b, dproj_w, dproj_b


@triton_op("eit_fast::block_mixer_backward", mutates_args=())
def block_mixer_backward(g: Tensor, x: Tensor, norm_w: Tensor, conv_w: Optional[Tensor], qkv_w: Optional[Tensor],
                         proj_w: Optional[Tensor], y_conv: Tensor, y_attn: Tensor, mean: Tensor, rstd: Tensor,
                         qkv: Tensor, o: Tensor, lse: Tensor, bits: Tensor, scale: Tensor, seed: Tensor, grid_h: int,
                         grid_w: int, num_heads: int, p_attn: float, p_conv: float, p_proj: float,
                         compute_dtype: torch.dtype
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dnorm_w, dnorm_b, dconv_w, dqkv_w, dqkv_b, dproj_w, dproj_b); empty tensors for an absent branch."""
    return backward_impl(g, x, norm_w, conv_w, qkv_w, proj_w, y_conv, y_attn, mean, rstd, qkv, o, lse, bits, scale,
                         seed, grid_h, grid_w, num_heads, p_attn, p_conv, p_proj, compute_dtype)


@block_mixer_backward.register_fake
def _(g, x, norm_w, conv_w, qkv_w, proj_w, y_conv, y_attn, mean, rstd, qkv, o, lse, bits, scale, seed, grid_h,
      grid_w, num_heads, p_attn, p_conv, p_proj, compute_dtype):
    like = lambda t: g.new_empty(0) if t is None else torch.empty_like(t)
    dqkv_b = g.new_empty(0) if qkv_w is None else qkv_w.new_empty(qkv_w.shape[:1])
    dproj_b = g.new_empty(0) if proj_w is None else proj_w.new_empty(proj_w.shape[:1])
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(norm_w),
            torch.empty_like(norm_w), like(conv_w), like(qkv_w), dqkv_b, like(proj_w), dproj_b)


def _setup_context(ctx, inputs, output):
    (x, norm_w, norm_b, conv_w, qkv_w, qkv_b, proj_w, proj_b, scale, seed, gh, gw, heads, eps, pa, pc, pp,
     cd) = inputs
    _, y_conv, y_attn, mean, rstd, qkv, o, lse, bits = output
    ctx.save_for_backward(x, norm_w, conv_w, qkv_w, proj_w, y_conv, y_attn, mean, rstd, qkv, o, lse, bits, scale,
                          seed)
    ctx.mark_non_differentiable(*output[1:])  # kept for the backward only: no zero-filled gradients for them
    ctx.set_materialize_grads(False)
    ctx.args = (gh, gw, heads, pa, pc, pp, cd)
    ctx.has = (conv_w is not None, qkv_w is not None)


def _backward(ctx, g, *_saved_grads):
    x, norm_w, conv_w, qkv_w, proj_w, y_conv, y_attn, mean, rstd, qkv, o, lse, bits, scale, seed = ctx.saved_tensors
    with _no_autocast(g.device.type):  # a backward called under autocast keeps our dtypes
        dx, dnw, dnb, dcw, dqw, dqb, dpw, dpb = block_mixer_backward(
            g, x, norm_w, conv_w, qkv_w, proj_w, y_conv, y_attn, mean, rstd, qkv, o, lse, bits, scale, seed,
            *ctx.args)
    has_conv, has_attn = ctx.has
    if not has_conv:
        dcw = None
    if not has_attn:
        dqw = dqb = dpw = dpb = None
    return (dx, dnw, dnb, dcw, dqw, dqb, dpw, dpb) + (None,) * 10


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
