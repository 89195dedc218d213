"""LayerNorm1 of an EIT block, split for the two branches of the mixer, and its backward with the residual.

Forward: y = LayerNorm(x) computed in fp32, written once in the mixer's compute dtype as the two operands
the branches read: y_conv (M, CP), the first C channels, and y_attn (M, AP), the last A = D - C channels,
each row padded with zeros to a multiple of 8 elements (CP, AP: 16-byte aligned rows for vector loads and
for the qkv GEMM). mean and rstd
(M,) fp32 are kept for the backward. M = B * N rows, x any strides.

Backward: dx = g + LayerNorm'(x)^T dy, dy = [dy_conv | dy_attn] (the residual's gradient g added in the same
pass), and per-program partial sums of dy * xhat and dy for the weight and bias gradients, summed by the
launcher in a fixed order (deterministic).
"""
import triton
import triton.language as tl


@triton.jit
def layernorm_fwd_kernel(x_ptr, w_ptr, b_ptr, yc_ptr, ya_ptr, mean_ptr, rstd_ptr, M, N, D, C, CP, AP,
                         s_xb, s_xn, s_xc, eps, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask_r = rows < M
    mask_c = cols < D
    mask = mask_r[:, None] & mask_c[None, :]
    bi, t = rows // N, rows % N
    x = tl.load(x_ptr + (bi * s_xb + t * s_xn)[:, None] + cols[None, :] * s_xc, mask=mask, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, 1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(yc_ptr + rows[:, None] * CP + cols[None, :], tl.where((cols < C)[None, :], y, 0.0).to(
        yc_ptr.dtype.element_ty), mask=mask_r[:, None] & (cols < CP)[None, :])
    ca = cols - C  # the attention operand, zero beyond A
    tl.store(ya_ptr + rows[:, None] * AP + ca[None, :], tl.where(mask_c[None, :], y, 0.0).to(
        ya_ptr.dtype.element_ty), mask=mask_r[:, None] & ((ca >= 0) & (ca < AP))[None, :])
    tl.store(mean_ptr + rows, mean, mask=mask_r)
    tl.store(rstd_ptr + rows, rstd, mask=mask_r)


@triton.jit
def layernorm_bwd_kernel(x_ptr, w_ptr, mean_ptr, rstd_ptr, dyc_ptr, dya_ptr, g_ptr, dx_ptr, dw_ptr, db_ptr,
                         M, N, D, C, CP, AP, s_xb, s_xn, s_xc, s_gb, s_gn, s_gc, SPLITS,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx (M, D) contiguous = g + LayerNorm backward of dy; dw/db partials (SPLITS, D) of this program."""
    split = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_c = cols < D
    is_conv = cols < C
    ca = cols - C
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_D], tl.float32)
    for r0 in range(split * BLOCK_R, M, SPLITS * BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask_r = rows < M
        mask = mask_r[:, None] & mask_c[None, :]
        bi, t = rows // N, rows % N
        x = tl.load(x_ptr + (bi * s_xb + t * s_xn)[:, None] + cols[None, :] * s_xc, mask=mask, other=0.0)
        mean = tl.load(mean_ptr + rows, mask=mask_r, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        dyc = tl.load(dyc_ptr + rows[:, None] * CP + cols[None, :], mask=mask_r[:, None] & is_conv[None, :],
                      other=0.0)
        dya = tl.load(dya_ptr + rows[:, None] * AP + ca[None, :], mask=mask & (ca >= 0)[None, :], other=0.0)
        dy = dyc.to(tl.float32) + dya.to(tl.float32)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, 1) / D
        c2 = tl.sum(wdy, 1) / D
        g = tl.load(g_ptr + (bi * s_gb + t * s_gn)[:, None] + cols[None, :] * s_gc, mask=mask, other=0.0)
        dx = g.to(tl.float32) + rstd[:, None] * (wdy - xhat * c1[:, None] - c2[:, None])
        tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, 0)
        db += tl.sum(dy, 0)
    tl.store(dw_ptr + split * D + cols, dw, mask=mask_c)
    tl.store(db_ptr + split * D + cols, db, mask=mask_c)


LN_BLOCK_R = 8
LN_BWD_BLOCK_R = 2  # the backward holds six row tiles at once: 8 (or 4) rows of 512 made ptxas spill on sm_86
LN_SPLITS = 256


def _block_d(D, CP, C, AP):
    return triton.next_power_of_2(max(D, CP, C + AP))


def launch_layernorm_forward(x, w, b, y_conv, y_attn, mean, rstd, conv_dim: int, eps: float, wrap=lambda k: k):
    """y_conv (M, CP) and y_attn (M, AP) in their own dtype (the mixer's compute dtype; None for an absent
    branch), mean and rstd (M,)."""
    B, N, D = x.shape
    M = B * N
    C = conv_dim
    CP = y_conv.shape[-1] if C else 0
    AP = y_attn.shape[-1] if D > C else 0
    yc = y_conv if C else y_attn
    ya = y_attn if AP else y_conv
    bd = _block_d(D, CP, C, AP)
    wrap(layernorm_fwd_kernel)[(triton.cdiv(M, LN_BLOCK_R),)](
        x, w, b, yc, ya, mean, rstd, M, N, D, C, CP, AP, *x.stride(), eps, BLOCK_R=LN_BLOCK_R, BLOCK_D=bd,
        num_warps=4 if bd <= 512 else 8)


def launch_layernorm_backward(x, w, mean, rstd, dy_conv, dy_attn, g, dx, conv_dim: int, wrap=lambda k: k):
    """dx (B, N, D) contiguous; returns (dw, db) (D,) fp32. dy_conv (M, CP) / dy_attn (M, AP) or None."""
    import torch
    B, N, D = x.shape
    M = B * N
    C = conv_dim
    CP = dy_conv.shape[-1] if C else 0
    AP = dy_attn.shape[-1] if D > C else 0
    dyc = dy_conv if C else dy_attn
    dya = dy_attn if AP else dy_conv
    splits = max(1, min(LN_SPLITS, triton.cdiv(M, 4 * LN_BWD_BLOCK_R)))
    part = torch.empty((2, splits, D), device=x.device, dtype=torch.float32)
    bd = _block_d(D, CP, C, AP)
    wrap(layernorm_bwd_kernel)[(splits,)](
        x, w, mean, rstd, dyc, dya, g, dx, part[0], part[1], M, N, D, C, CP, AP, *x.stride(), *g.stride(), splits,
        BLOCK_R=LN_BWD_BLOCK_R, BLOCK_D=bd, num_warps=4 if bd <= 512 else 8)
    return part[0].sum(0), part[1].sum(0)
