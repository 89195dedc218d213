"""The EIT token mixer's own launches: attention + conv tiles in one grid, the output projection with the
residual in its epilogue, and the elementwise gradient of the mixer's output.

Launch 1 (`mixer_fwd_kernel`): one grid covering the attention tiles (flash attention of every
(batch, head, query slab), writing o) and the conv tiles (depthwise conv of every (batch, token slab,
channel slab), writing x + scale * z straight into the output's first C channels). Launch 2
(`proj_residual_kernel`): the output projection as one GEMM over the padded heads whose epilogue adds
bias, dropout, the per-sample drop-path scale and the residual, writing the output's last A channels.
Neither z nor the concatenation of the two branches ever reaches memory.

Backward (`mixer_grad_kernel`): gz = g * scale[b] * (dropout mask / keep rate), written once in the compute
dtype as the two operands its consumers read: gz_conv (M, C) for the conv backward, ga (M, A) for the
projection's GEMMs; plus per-program partial sums of ga for the projection's bias gradient.
"""
import triton
import triton.language as tl

from .attention import _dot, attn_fwd_tile
from .dwconv import conv_fwd_tile
from .dropout import keep


@triton.jit
def mixer_fwd_kernel(x_ptr, y_ptr, w_ptr, qkv_ptr, o_ptr, lse_ptr, bits_ptr, scale_ptr, seed_ptr, out_ptr,
                     B, N, H, C, CP8, GH, GW, s_xb, s_xn, s_xc, s_outb, s_outn, s_outc, qk_scale, p_attn, p_conv,
                     HAS_ATTN: tl.constexpr, HAS_CONV: tl.constexpr, HP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                     ATTN_DROPOUT: tl.constexpr, CONV_DROPOUT: tl.constexpr, RNG64: tl.constexpr,
                     DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """y: the conv operand (B*N, CP = 8 * CP8) contiguous, w (9, CP); qkv (B, N, 3, H, HP); o (B, N, H, HP); bits: the
    attention dropout's keep bits (attention.bits_shape), written when ATTN_DROPOUT."""
    pid = tl.program_id(0)
    n_attn = 0
    if HAS_ATTN:
        n_m = tl.cdiv(N, BLOCK_M)
        n_attn = n_m * B * H
        if pid < n_attn:
            attn_fwd_tile(qkv_ptr, o_ptr, lse_ptr, bits_ptr, seed_ptr, pid % n_m, pid // n_m, N, H, qk_scale, p_attn,
                          HP, BLOCK_M, BLOCK_N, BLOCK_D, ATTN_DROPOUT, RNG64, DOT_F32, PREC)
    if HAS_CONV:
        if pid >= n_attn:
            q = pid - n_attn
            n_t = tl.cdiv(N, BLOCK_T)
            n_c = tl.cdiv(C, BLOCK_C)
            conv_fwd_tile(x_ptr, y_ptr, w_ptr, scale_ptr, seed_ptr, out_ptr, q // (n_t * n_c), q % n_t,
                          (q // n_t) % n_c, N, C, CP8, GH, GW, s_xb, s_xn, s_xc, s_outb, s_outn, s_outc, p_conv,
                          BLOCK_T, BLOCK_C, CONV_DROPOUT)


@triton.jit
def proj_residual_kernel(o_ptr, w_ptr, bias_ptr, x_ptr, scale_ptr, seed_ptr, out_ptr,
                         N, H, A, C, M, s_xb, s_xn, s_xc, s_outb, s_outn, s_outc, p_proj,
                         HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DROPOUT: tl.constexpr, BIG: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """out[b, t, C + j] = x[b, t, C + j] + scale[b] * dropout(o[b, t, :] @ W[j, :] + bias[j]).

    o is (M, K) contiguous and W (A, K) contiguous (nn.Linear layout over the padded heads), K = H * HP
    (a multiple of 8), rows m = b * N + t. Offsets are int32 (fewer registers for the epilogue's pointers)
    unless BIG (a tensor of 2^31 elements or more)."""
    K = H * HP
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if BIG:
        rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < A
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < K
        a = tl.load(o_ptr + rows[:, None] * K + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * K + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _dot_acc(a, wt, acc, DOT_F32, PREC)
    acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if DROPOUT:
        kept = keep(seed_ptr, 2, rows[:, None].to(tl.int64) * A + cols[None, :], p_proj)
        acc = tl.where(kept, acc / (1.0 - p_proj), 0.0)
    b = rows // N
    t = rows - b * N
    mask = mask_m[:, None] & mask_n[None, :]
    cc = (C + cols)[None, :]
    xv = tl.load(x_ptr + (b * s_xb + t * s_xn)[:, None] + cc * s_xc, mask=mask, other=0.0)
    sc = tl.load(scale_ptr + b, mask=mask_m, other=0.0)
    tl.store(out_ptr + (b * s_outb + t * s_outn)[:, None] + cc * s_outc,
             (xv.to(tl.float32) + sc[:, None] * acc).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot_acc(a, b, acc, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def mixer_grad_kernel(g_ptr, scale_ptr, seed_ptr, gzc_ptr, ga_ptr, dbias_ptr, M, N, D, C, CP,
                      s_gb, s_gn, s_gc, p_conv, p_proj, SPLITS,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      CONV_DROPOUT: tl.constexpr, PROJ_DROPOUT: tl.constexpr):
    """gz = dL/dz = g * scale[b] * (dropout mask / keep rate), rows m = b * N + t: conv channels (< C) into
    gz_conv (M, CP) with the conv branch's mask (none on CLS), the others into ga (M, A) with the
    projection's; dbias (SPLITS, A) fp32: this program's column sums of ga (before rounding)."""
    split, pid_c = tl.program_id(0), tl.program_id(1)
    A = D - C
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ch < D
    is_conv = (ch < C)[None, :]
    ca = ch - C
    bias = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(split * BLOCK_R, M, SPLITS * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask_r = rows < M
        mask = mask_r[:, None] & mask_c[None, :]
        b, t = rows // N, rows % N
        g = tl.load(g_ptr + (b * s_gb + t * s_gn)[:, None] + ch[None, :] * s_gc, mask=mask, other=0.0)
        g = g.to(tl.float32) * tl.load(scale_ptr + b, mask=mask_r, other=0.0)[:, None]
        if CONV_DROPOUT:
            kc = keep(seed_ptr, 1, rows[:, None] * C + ch[None, :], p_conv)
            g = tl.where(is_conv & (t >= 1)[:, None], tl.where(kc, g / (1.0 - p_conv), 0.0), g)
        if PROJ_DROPOUT:
            kp = keep(seed_ptr, 2, rows[:, None] * A + ca[None, :], p_proj)
            g = tl.where(is_conv, g, tl.where(kp, g / (1.0 - p_proj), 0.0))
        tl.store(gzc_ptr + rows[:, None] * CP + ch[None, :], g.to(gzc_ptr.dtype.element_ty), mask=mask & is_conv)
        tl.store(ga_ptr + rows[:, None] * A + ca[None, :], g.to(ga_ptr.dtype.element_ty),
                 mask=mask & (ch >= C)[None, :])
        bias += tl.sum(g, 0)
    tl.store(dbias_ptr + split * A + ca, bias, mask=mask_c & (ca >= 0))


GRAD_BLOCK_R, GRAD_BLOCK_C, GRAD_SPLITS = 16, 128, 128


def launch_mixer_forward(x, y_conv, conv_w9, qkv, o, lse, bits, scale, seed, out, conv_dim: int, grid_hw,
                         head_dim: int, p_attn: float, p_conv: float, cfg: dict, conv_tile: tuple, dot_opts: dict,
                         wrap=lambda k: k):
    """out[..., :C] = x + scale * conv branch; o, lse of the attention (its projection is the next launch).

    y_conv: the conv operand (B*N, CP) contiguous or None, conv_w9 its (9, CP) weights (dwconv.tap_major);
    qkv: (B, N, 3, H, HP) or None. cfg: the attention tile (BLOCK_M, BLOCK_N, num_warps, num_stages);
    conv_tile: (BLOCK_T, BLOCK_C)."""
    from .attention import LOG2E, block_d, rng64
    B, N, D = x.shape
    C = conv_dim
    CP = y_conv.shape[-1] if C else 8
    GH, GW = grid_hw[0], max(grid_hw[1], 1)  # no patches (N = 1): keep the modulo defined
    A = qkv is not None
    H, HP = (qkv.shape[3], qkv.shape[4]) if A else (1, 8)
    n_attn = triton.cdiv(N, cfg["BLOCK_M"]) * B * H if A else 0
    bt, bc = conv_tile
    n_conv = triton.cdiv(N, bt) * triton.cdiv(C, bc) * B if C else 0
    yy, ww = (y_conv, conv_w9) if C else (x, x)  # placeholders: the branch that uses them is compiled out
    qq, oo, ll = (qkv, o, lse) if A else (x, x, x)
    bb = bits if A and p_attn > 0 else ll
    wrap(mixer_fwd_kernel)[(n_attn + n_conv,)](
        x, yy, ww, qq, oo, ll, bb, scale, seed, out, B, N, H, C, CP // 8, GH, GW, *x.stride(), *out.stride(),
        head_dim ** -0.5 * LOG2E, p_attn, p_conv,
        HAS_ATTN=A, HAS_CONV=C > 0, HP=HP, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d(HP),
        BLOCK_T=bt, BLOCK_C=bc, ATTN_DROPOUT=p_attn > 0, CONV_DROPOUT=p_conv > 0, RNG64=rng64(B * H, N),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **dot_opts)


def launch_projection(o, proj_w, proj_b, x, scale, seed, out, p_proj: float, cfg: dict, dot_opts: dict,
                      wrap=lambda k: k):
    """out[..., C:] = x[..., C:] + scale * dropout(o @ W^T + b). o (B, N, H, HP), W (A, H * HP)."""
    B, N, H, HP = o.shape
    A = proj_w.shape[0]
    C = x.shape[-1] - A
    M = B * N
    wrap(proj_residual_kernel)[(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(A, cfg["BLOCK_N"]))](
        o, proj_w, proj_b, x, scale, seed, out, N, H, A, C, M, *x.stride(), *out.stride(), p_proj,
        HP=HP, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], DROPOUT=p_proj > 0,
        BIG=max(x.numel(), out.numel(), o.numel()) >= 2 ** 31 - 2 ** 20,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **dot_opts)


def launch_mixer_grad(g, scale, seed, gz_conv, ga, conv_dim: int, p_conv: float, p_proj: float,
                      wrap=lambda k: k):
    """Fill gz_conv (M, CP) and ga (M, A) (either None when its branch is absent); returns the projection's
    bias gradient (A,) fp32 (or None)."""
    import torch
    B, N, D = g.shape
    M = B * N
    A = D - conv_dim
    CP = gz_conv.shape[-1] if conv_dim else 8
    conv_drop, proj_drop = p_conv > 0 and conv_dim > 0, p_proj > 0 and A > 0
    br = GRAD_BLOCK_R // 2 if conv_drop and proj_drop else GRAD_BLOCK_R  # two generators: half the rows
    splits = max(1, min(GRAD_SPLITS, triton.cdiv(M, 4 * br)))
    part = torch.empty((splits, max(A, 1)), device=g.device, dtype=torch.float32)
    gzc = gz_conv if conv_dim else ga
    gaa = ga if A else gz_conv
    wrap(mixer_grad_kernel)[(splits, triton.cdiv(D, GRAD_BLOCK_C))](
        g, scale, seed, gzc, gaa, part, M, N, D, conv_dim, CP, *g.stride(), p_conv, p_proj, splits,
        BLOCK_R=br, BLOCK_C=GRAD_BLOCK_C, CONV_DROPOUT=conv_drop, PROJ_DROPOUT=proj_drop, num_warps=4)
    return part.sum(0) if A else None
