"""The EIT token mixer's forward in two launches, and the elementwise gradient of its output.

Launch 1 (`mixer_fwd_kernel`): one grid covering the attention tiles (flash attention of every
(batch, head, query slab), writing o) and the conv tiles (depthwise conv of every (batch, token slab,
channel slab), writing x + scale * z straight into the output's first C channels). Launch 2
(`proj_residual_kernel`): the output projection as one GEMM whose epilogue adds bias, dropout, the
per-sample drop-path scale and the residual, writing the output's last A channels. Neither z nor the
concatenation of the two branches ever reaches memory.
"""
import torch
import triton
import triton.language as tl

from .attention import LOG2E, _dot, attn_fwd_tile, block_d, dot_options, tiles
from .dwconv import CONV_BLOCK_C, CONV_BLOCK_T, conv_fwd_tile
from .dropout import keep


@triton.jit
def mixer_fwd_kernel(x_ptr, y_ptr, w_ptr, qkv_ptr, o_ptr, lse_ptr, scale_ptr, seed_ptr, out_ptr,
                     B, N, H, A, HD, C, GH, GW,
                     s_xb, s_xn, s_xc, s_yb, s_yn, s_yc, s_qb, s_qn, s_qc, s_ob, s_on, s_oc,
                     s_outb, s_outn, s_outc, qk_scale, p_attn, p_conv,
                     HAS_ATTN: tl.constexpr, HAS_CONV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                     ATTN_DROPOUT: tl.constexpr, CONV_DROPOUT: tl.constexpr,
                     DOT_F32: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    n_attn = 0
    if HAS_ATTN:
        n_m = tl.cdiv(N, BLOCK_M)
        n_attn = n_m * B * H
        if pid < n_attn:
            attn_fwd_tile(qkv_ptr, o_ptr, lse_ptr, seed_ptr, pid % n_m, pid // n_m,
                          N, H, A, HD, s_qb, s_qn, s_qc, s_ob, s_on, s_oc, qk_scale, p_attn,
                          BLOCK_M, BLOCK_N, BLOCK_D, ATTN_DROPOUT, DOT_F32, PREC)
    if HAS_CONV:
        if pid >= n_attn:
            q = pid - n_attn
            n_t = tl.cdiv(N, BLOCK_T)
            n_c = tl.cdiv(C, BLOCK_C)
            conv_fwd_tile(x_ptr, y_ptr, w_ptr, scale_ptr, seed_ptr, out_ptr, q // (n_t * n_c), q % n_t,
                          (q // n_t) % n_c, N, C, GH, GW, s_xb, s_xn, s_xc, s_yb, s_yn, s_yc,
                          s_outb, s_outn, s_outc, p_conv, BLOCK_T, BLOCK_C, CONV_DROPOUT)


@triton.jit
def proj_residual_kernel(o_ptr, w_ptr, bias_ptr, x_ptr, scale_ptr, seed_ptr, out_ptr,
                         N, A, C, M, s_xb, s_xn, s_xc, s_outb, s_outn, s_outc, p_proj,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """out[b, t, C + j] = x[b, t, C + j] + scale[b] * dropout(o[b, t, :] @ W[j, :] + bias[j]).

    o is (B*N, A) contiguous, W (A, A) contiguous (nn.Linear layout), rows m = b * N + t."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < A
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, A, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < A
        a = tl.load(o_ptr + rows[:, None] * A + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * A + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += _dot(a, wt.to(a.dtype), DOT_F32, PREC)
    acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if DROPOUT:
        kept = keep(seed_ptr, 2, rows[:, None] * A + cols[None, :], p_proj)
        acc = tl.where(kept, acc / (1.0 - p_proj), 0.0)
    b = rows // N
    t = rows % N
    mask = mask_m[:, None] & mask_n[None, :]
    cc = (C + cols)[None, :]
    xv = tl.load(x_ptr + b[:, None] * s_xb + t[:, None] * s_xn + cc * s_xc, mask=mask, other=0.0)
    sc = tl.load(scale_ptr + b, mask=mask_m, other=0.0)
    tl.store(out_ptr + b[:, None] * s_outb + t[:, None] * s_outn + cc * s_outc,
             (xv.to(tl.float32) + sc[:, None] * acc).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mixer_grad_kernel(g_ptr, scale_ptr, seed_ptr, gz_ptr, N, D, C, s_gb, s_gn, s_gc, p_conv, p_proj,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                      CONV_DROPOUT: tl.constexpr, PROJ_DROPOUT: tl.constexpr):
    """gz = dL/dz = g * scale[b] * (dropout mask / keep rate) for both branches; gz is (B, N, D) contiguous.

    Conv channels (< C) use the conv branch's mask (none on CLS); the others the projection's."""
    b, pid_t, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (t < N)[:, None] & (ch < D)[None, :]
    rows = t[:, None].to(tl.int64)
    g = tl.load(g_ptr + b * s_gb + rows * s_gn + ch[None, :] * s_gc, mask=mask, other=0.0).to(tl.float32)
    g = g * tl.load(scale_ptr + b)
    is_conv = (ch < C)[None, :]
    if CONV_DROPOUT:
        kc = keep(seed_ptr, 1, (b * N + rows) * C + ch[None, :], p_conv)
        g = tl.where(is_conv & (rows >= 1), tl.where(kc, g / (1.0 - p_conv), 0.0), g)
    if PROJ_DROPOUT:
        A = D - C
        kp = keep(seed_ptr, 2, (b * N + rows) * A + (ch - C)[None, :], p_proj)
        g = tl.where(is_conv, g, tl.where(kp, g / (1.0 - p_proj), 0.0))
    tl.store(gz_ptr + (b * N + rows) * D + ch[None, :], g.to(gz_ptr.dtype.element_ty), mask=mask)


PROJ_BLOCK_M, PROJ_BLOCK_N, PROJ_BLOCK_K = 64, 64, 32
GRAD_BLOCK_T, GRAD_BLOCK_C = 16, 128


def launch_mixer_forward(x, y, w, qkv, proj_w, proj_b, scale, seed, out, o, lse, grid_hw, num_heads: int,
                         p_attn: float, p_conv: float, p_proj: float, wrap=lambda k: k):
    """Fill out (B, N, D) = x + scale * concat(conv branch, attention branch); o and lse for the backward.

    y: the conv channels of the normed input (B, N, C) or None; qkv: (B, N, 3A) or None."""
    B, N, D = x.shape
    C = 0 if y is None else y.shape[-1]
    A = D - C
    GH, GW = grid_hw[0], max(grid_hw[1], 1)  # no patches (N = 1): keep the modulo defined
    H = num_heads if A else 1
    HD = A // H if A else 1
    dtype = qkv.dtype if A else y.dtype
    t = tiles(dtype)
    n_attn = triton.cdiv(N, t["FWD_M"]) * B * H if A else 0
    n_conv = triton.cdiv(N, CONV_BLOCK_T) * triton.cdiv(C, CONV_BLOCK_C) * B if C else 0
    yy = y if C else x  # placeholders: the branch that uses them is compiled out
    qq, oo = (qkv, o) if A else (x, x)
    wrap(mixer_fwd_kernel)[(n_attn + n_conv,)](
        x, yy, w if C else x, qq, oo, lse if A else x, scale, seed, out,
        B, N, H, A, HD, C, GH, GW, *x.stride(), *yy.stride(), *qq.stride(), *oo.stride(), *out.stride(),
        HD ** -0.5 * LOG2E, p_attn, p_conv,
        HAS_ATTN=A > 0, HAS_CONV=C > 0, BLOCK_M=t["FWD_M"], BLOCK_N=t["FWD_N"], BLOCK_D=block_d(HD),
        BLOCK_T=CONV_BLOCK_T, BLOCK_C=CONV_BLOCK_C, ATTN_DROPOUT=p_attn > 0, CONV_DROPOUT=p_conv > 0,
        num_warps=t["WARPS"], num_stages=t["FWD_STAGES"], **dot_options(dtype))
    if A:
        M = B * N
        bm = PROJ_BLOCK_M if dtype != torch.float32 else PROJ_BLOCK_M // 2
        wrap(proj_residual_kernel)[(triton.cdiv(M, bm), triton.cdiv(A, PROJ_BLOCK_N))](
            o, proj_w, proj_b, x, scale, seed, out, N, A, C, M, *x.stride(), *out.stride(), p_proj,
            BLOCK_M=bm, BLOCK_N=PROJ_BLOCK_N, BLOCK_K=PROJ_BLOCK_K, DROPOUT=p_proj > 0,
            num_warps=t["WARPS"], **dot_options(o.dtype))


def launch_mixer_grad(g, scale, seed, gz, conv_dim: int, p_conv: float, p_proj: float, wrap=lambda k: k):
    B, N, D = g.shape
    wrap(mixer_grad_kernel)[(B, triton.cdiv(N, GRAD_BLOCK_T), triton.cdiv(D, GRAD_BLOCK_C))](
        g, scale, seed, gz, N, D, conv_dim, *g.stride(), p_conv, p_proj,
        BLOCK_T=GRAD_BLOCK_T, BLOCK_C=GRAD_BLOCK_C, CONV_DROPOUT=p_conv > 0 and conv_dim > 0,
        PROJ_DROPOUT=p_proj > 0 and conv_dim < D, num_warps=4)
