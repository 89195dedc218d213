"""EIT-T's depthwise 3x3 conv over the patch-token grid, on tokens laid out (B*N, CP) rows, N = 1 + Hp*Wp.

Token 0 is CLS and passes through unchanged; token t >= 1 sits at row (t-1) // Wp, column (t-1) % Wp of
the grid, zero padding 1. Channels are the contiguous dimension and each row is CP = C rounded up to a
multiple of 8 elements, so the 16-bit loads are vectors: loads are masked at CP, not C (a mask that changes
inside a group of 8 would split the vector), and the padding lanes' results are never stored. A tile is
BLOCK_T tokens x BLOCK_C channels and each of the 9 taps is one shifted, masked load. Weights are (9, CP),
tap-major and zero-padded, so a tap's BLOCK_C weights are one vector load too.
"""
import triton
import triton.language as tl

from .dropout import keep


@triton.jit
def conv_fwd_tile(x_ptr, y_ptr, w_ptr, scale_ptr, seed_ptr, out_ptr, b, pid_t, pid_c,
                  N, C, CP8, GH, GW, s_xb, s_xn, s_xc, s_ob, s_on, s_oc, p_drop,
                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, DROPOUT: tl.constexpr):
    """out[b, t, c] = x[b, t, c] + scale[b] * z[b, t, c], z = dropout(conv(y)) (CLS: z = y), c < C."""
    CP = CP8 * 8  # the row stride, passed in units of 8 so the compiler sees the alignment
    b = b.to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = t < N
    mask_c = ch < C
    mask_v = ch < CP  # loads of the padded rows
    r = (t - 1) // GW
    s = (t - 1) % GW
    is_patch = (t >= 1) & mask_t
    y_b = y_ptr + b * N * CP + ch[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for kh in tl.static_range(3):
        for kw in tl.static_range(3):
            rr = r + (kh - 1)
            ss = s + (kw - 1)
            ok = is_patch & (rr >= 0) & (rr < GH) & (ss >= 0) & (ss < GW)
            src = (1 + rr * GW + ss).to(tl.int64)
            yv = tl.load(y_b + src[:, None] * CP, mask=ok[:, None] & mask_v[None, :], other=0.0)
            wv = tl.load(w_ptr + (kh * 3 + kw) * CP + ch, mask=mask_v, other=0.0)
            acc += yv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if DROPOUT:
        kept = keep(seed_ptr, 1, (b * N + t[:, None]) * C + ch[None, :], p_drop)
        acc = tl.where(kept, acc / (1.0 - p_drop), 0.0)
    mask = mask_t[:, None] & mask_c[None, :]
    cls = tl.load(y_b + t[:, None].to(tl.int64) * CP, mask=(t == 0)[:, None] & mask_v[None, :], other=0.0)
    z = tl.where((t == 0)[:, None], cls.to(tl.float32), acc)
    rows = t[:, None].to(tl.int64)
    xv = tl.load(x_ptr + b * s_xb + rows * s_xn + ch[None, :] * s_xc, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + b)
    tl.store(out_ptr + b * s_ob + rows * s_on + ch[None, :] * s_oc,
             (xv + sc * z).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv_bwd_input_kernel(gz_ptr, w_ptr, dy_ptr, N, C, CP8, GH, GW, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dy = conv_transpose(gz) on patch tokens (the 3x3 taps mirrored); dy = gz on CLS. gz, dy: (B*N, CP).

    gz is the gradient of z: already scaled per sample and masked by the branch dropout."""
    CP = CP8 * 8  # the row stride, passed in units of 8 so the compiler sees the alignment
    b, pid_t, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = t < N
    mask_c = ch < C
    mask_v = ch < CP
    r = (t - 1) // GW
    s = (t - 1) % GW
    is_patch = (t >= 1) & mask_t
    g_b = gz_ptr + b * N * CP + ch[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for kh in tl.static_range(3):
        for kw in tl.static_range(3):
            rr = r - (kh - 1)
            ss = s - (kw - 1)
            ok = is_patch & (rr >= 0) & (rr < GH) & (ss >= 0) & (ss < GW)
            src = (1 + rr * GW + ss).to(tl.int64)
            gv = tl.load(g_b + src[:, None] * CP, mask=ok[:, None] & mask_v[None, :], other=0.0)
            wv = tl.load(w_ptr + (kh * 3 + kw) * CP + ch, mask=mask_v, other=0.0)
            acc += gv.to(tl.float32) * wv.to(tl.float32)[None, :]
    cls = tl.load(g_b + t[:, None].to(tl.int64) * CP, mask=(t == 0)[:, None] & mask_v[None, :], other=0.0)
    acc = tl.where((t == 0)[:, None], cls.to(tl.float32), acc)
    tl.store(dy_ptr + (b * N + t[:, None].to(tl.int64)) * CP + ch[None, :], acc.to(dy_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_c[None, :])


@triton.jit
def _wgrad_tap(g, y_b, t, r, s, mask_v, N, GH, GW, CP, KH: tl.constexpr, KW: tl.constexpr):
    """sum over this slab's tokens of gz * y shifted by tap (KH, KW): one (BLOCK_C,) partial."""
    rr = r + (KH - 1)
    ss = s + (KW - 1)
    ok = (t >= 1) & (t < N) & (rr >= 0) & (rr < GH) & (ss >= 0) & (ss < GW)
    src = (1 + rr * GW + ss).to(tl.int64)
    yv = tl.load(y_b + src[:, None] * CP, mask=ok[:, None] & mask_v[None, :], other=0.0)
    return tl.sum(g * yv.to(tl.float32), 0)


@triton.jit
def conv_bwd_weight_kernel(gz_ptr, y_ptr, part_ptr, B, N, C, CP8, GH, GW, SPLITS,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[split, tap, c] = sum over this split's (sample, token slab) pairs of gz * shifted y, all 9 taps.

    Deterministic: each split writes its own partial; the launcher sums them."""
    CP = CP8 * 8  # the row stride, passed in units of 8 so the compiler sees the alignment
    pid_c, split = tl.program_id(0), tl.program_id(1)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ch < C
    mask_v = ch < CP
    n_tb = tl.cdiv(N, BLOCK_T)
    a0 = tl.zeros([BLOCK_C], tl.float32)
    a1 = tl.zeros([BLOCK_C], tl.float32)
    a2 = tl.zeros([BLOCK_C], tl.float32)
    a3 = tl.zeros([BLOCK_C], tl.float32)
    a4 = tl.zeros([BLOCK_C], tl.float32)
    a5 = tl.zeros([BLOCK_C], tl.float32)
    a6 = tl.zeros([BLOCK_C], tl.float32)
    a7 = tl.zeros([BLOCK_C], tl.float32)
    a8 = tl.zeros([BLOCK_C], tl.float32)
    for j in range(split, B * n_tb, SPLITS):
        b = (j // n_tb).to(tl.int64)
        t = (j % n_tb) * BLOCK_T + tl.arange(0, BLOCK_T)
        r = (t - 1) // GW
        s = (t - 1) % GW
        g = tl.load(gz_ptr + (b * N + t[:, None].to(tl.int64)) * CP + ch[None, :],
                    mask=((t >= 1) & (t < N))[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
        y_b = y_ptr + b * N * CP + ch[None, :]
        a0 += _wgrad_tap(g, y_b, t, r, s, mask_v, N, GH, GW, CP, 0, 0)
        a1 += _wgrad_tap(g, y_b, t, r, s, mask_v, N, GH, GW, CP, 0, 1)
        a2 += _wgrad_tap(g, y_b, t, r, s, mask_v, N, GH, GW, CP, 0, 2)
        a3 += _wgrad_tap(g, y_b, t, r, s, mask_v, N, GH, GW, CP, 1, 0)
        a4 += _wgrad_tap(g, y_b, t, r, s, mask_v, N, GH, GW, CP, 1, 1)
        a5 += _wgrad_tap(g, y_b, t, r, s, mask_v, N, GH, GW, CP, 1, 2)
        a6 += _wgrad_tap(g, y_b, t, r, s, mask_v, N, GH, GW, CP, 2, 0)
        a7 += _wgrad_tap(g, y_b, t, r, s, mask_v, N, GH, GW, CP, 2, 1)
        a8 += _wgrad_tap(g, y_b, t, r, s, mask_v, N, GH, GW, CP, 2, 2)
    out = part_ptr + split.to(tl.int64) * 9 * C + ch
    tl.store(out + 0 * C, a0, mask=mask_c)
    tl.store(out + 1 * C, a1, mask=mask_c)
    tl.store(out + 2 * C, a2, mask=mask_c)
    tl.store(out + 3 * C, a3, mask=mask_c)
    tl.store(out + 4 * C, a4, mask=mask_c)
    tl.store(out + 5 * C, a5, mask=mask_c)
    tl.store(out + 6 * C, a6, mask=mask_c)
    tl.store(out + 7 * C, a7, mask=mask_c)
    tl.store(out + 8 * C, a8, mask=mask_c)


CONV_BLOCK_T, CONV_BLOCK_C = 16, 64
WGRAD_SPLITS = 128


def tap_major(w, cp: int):
    """(C, 1, 3, 3) weights -> (9, CP), zero beyond C: the layout the kernels read."""
    import torch.nn.functional as F
    c = w.shape[0]
    return F.pad(w.reshape(c, 9).t(), (0, cp - c)).contiguous()


def launch_conv_backward(gz, y, w9, dy, num_channels: int, grid_hw, wrap=lambda k: k):
    """dy (B, N, CP) and the weight gradient (C, 1, 3, 3) in fp32, from gz = dL/dz of the conv channels.
    gz, y, dy: (B, N, CP) contiguous; w9: (9, CP) from tap_major."""
    import torch
    B, N, CP = gz.shape
    C = num_channels
    GH, GW = grid_hw[0], max(grid_hw[1], 1)  # no patches (N = 1): keep the modulo defined
    BT, BC = CONV_BLOCK_T, CONV_BLOCK_C
    wrap(conv_bwd_input_kernel)[(B, triton.cdiv(N, BT), triton.cdiv(C, BC))](
        gz, w9, dy, N, C, CP // 8, GH, GW, BLOCK_T=BT, BLOCK_C=BC, num_warps=4)
    splits = max(1, min(WGRAD_SPLITS, triton.cdiv(B * triton.cdiv(N, BT), 4)))
    part = torch.empty((splits, 9, C), device=gz.device, dtype=torch.float32)
    wrap(conv_bwd_weight_kernel)[(triton.cdiv(C, BC), splits)](
        gz, y, part, B, N, C, CP // 8, GH, GW, splits, BLOCK_T=BT, BLOCK_C=BC, num_warps=4)
    return part.sum(0).t().reshape(C, 1, 3, 3)
