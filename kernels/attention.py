"""Flash-style multi-head attention, forward and backward, reading q, k, v straight from the qkv Linear's
output (B, N, 3A) with A = H * HD channels laid out as (3, H, HD), and writing o as (B, N, A) = (B, N, H, HD).

Online softmax: no N x N matrix ever reaches memory. Any N (masked tails) and any head size: the head
dimension is padded to BLOCK_D (a power of 2, >= 16 for tl.dot) inside the kernel under masks, never in
memory. lse is kept in log2 units (the kernels use exp2). Dropout on the probabilities comes from
dropout.keep at offset ((b*H + h)*N + i)*N + j, regenerated in the backward.
"""
import triton
import triton.language as tl

from . import INTERPRET
from .dropout import keep

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    # DOT_F32: the interpreter's bf16 dot is wrong, so interpreted runs multiply in fp32.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def attn_fwd_tile(qkv_ptr, o_ptr, lse_ptr, seed_ptr, pid_m, pid_bh,
                  N, H, A, HD, s_qb, s_qn, s_qc, s_ob, s_on, s_oc, qk_scale, p_drop,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """One BLOCK_M slab of queries of one (batch, head): o and lse for those rows."""
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HD
    base = qkv_ptr + b * s_qb + (h * HD + offs_d) * s_qc
    q = tl.load(base[None, :] + offs_m[:, None].to(tl.int64) * s_qn,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_off = (pid_bh.to(tl.int64) * N + offs_m) * N
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kv_mask = mask_d[:, None] & mask_n[None, :]
        kt = tl.load(base[:, None] + A * s_qc + offs_n[None, :].to(tl.int64) * s_qn, mask=kv_mask, other=0.0)
        qk = _dot(q, kt, DOT_F32, PREC) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            kept = keep(seed_ptr, 0, row_off[:, None] + offs_n[None, :], p_drop)
            p = tl.where(kept, p / (1.0 - p_drop), 0.0)
        vt = tl.load(base[:, None] + 2 * A * s_qc + offs_n[None, :].to(tl.int64) * s_qn, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), tl.trans(vt), DOT_F32, PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptrs = o_ptr + b * s_ob + offs_m[:, None].to(tl.int64) * s_on + (h * HD + offs_d)[None, :] * s_oc
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, N, H, HD, s_ob, s_on, s_oc, s_db, s_dn, s_dc,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O: the softmax backward's row term (dropout leaves it unchanged)."""
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)  # B*H on axis 0: no 65535 limit
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N)[:, None] & (offs_d < HD)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    cols = (h * HD + offs_d)[None, :]
    o = tl.load(o_ptr + b * s_ob + rows * s_on + cols * s_oc, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * s_db + rows * s_dn + cols * s_dc, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * N + offs_m, tl.sum(o * do, 1), mask=offs_m < N)


@triton.jit
def attn_bwd_dkdv_kernel(qkv_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, seed_ptr,
                         N, H, A, HD, s_qb, s_qn, s_qc, s_db, s_dn, s_dc, s_gb, s_gn, s_gc,
                         sm_scale, qk_scale, p_drop,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """dK and dV of one BLOCK_N slab of keys of one (batch, head), looping over all queries."""
    pid_bh, pid_n = tl.program_id(0), tl.program_id(1)  # B*H on axis 0: no 65535 limit
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HD
    nd_mask = mask_n[:, None] & mask_d[None, :]
    base = qkv_ptr + b * s_qb + (h * HD + offs_d) * s_qc
    rows_n = offs_n[:, None].to(tl.int64) * s_qn
    k = tl.load(base[None, :] + A * s_qc + rows_n, mask=nd_mask, other=0.0)
    v = tl.load(base[None, :] + 2 * A * s_qc + rows_n, mask=nd_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    do_base = do_ptr + b * s_db + (h * HD + offs_d) * s_dc
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        dm_mask = mask_d[:, None] & mask_m[None, :]
        qt = tl.load(base[:, None] + offs_m[None, :].to(tl.int64) * s_qn, mask=dm_mask, other=0.0)
        dot_t = tl.load(do_base[:, None] + offs_m[None, :].to(tl.int64) * s_dn, mask=dm_mask, other=0.0)
        lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * N + offs_m, mask=mask_m, other=0.0)
        pt = tl.exp2(_dot(k, qt, DOT_F32, PREC) * qk_scale - lse[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)
        dpt = _dot(v, dot_t.to(v.dtype), DOT_F32, PREC)
        if DROPOUT:
            offs = (pid_bh.to(tl.int64) * N + offs_m[None, :]) * N + offs_n[:, None]
            kept = keep(seed_ptr, 0, offs, p_drop)
            pdt = tl.where(kept, pt / (1.0 - p_drop), 0.0)
            dpt = tl.where(kept, dpt / (1.0 - p_drop), 0.0)
        else:
            pdt = pt
        dv += _dot(pdt.to(v.dtype), tl.trans(dot_t).to(v.dtype), DOT_F32, PREC)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(k.dtype), tl.trans(qt), DOT_F32, PREC)
    g_base = dqkv_ptr + b * s_gb + offs_n[:, None].to(tl.int64) * s_gn + (h * HD + offs_d)[None, :] * s_gc
    tl.store(g_base + A * s_gc, (dk * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=nd_mask)
    tl.store(g_base + 2 * A * s_gc, dv.to(dqkv_ptr.dtype.element_ty), mask=nd_mask)


@triton.jit
def attn_bwd_dq_kernel(qkv_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, seed_ptr,
                       N, H, A, HD, s_qb, s_qn, s_qc, s_db, s_dn, s_dc, s_gb, s_gn, s_gc,
                       sm_scale, qk_scale, p_drop,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """dQ of one BLOCK_M slab of queries of one (batch, head), looping over all keys."""
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)  # B*H on axis 0: no 65535 limit
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HD
    md_mask = mask_m[:, None] & mask_d[None, :]
    base = qkv_ptr + b * s_qb + (h * HD + offs_d) * s_qc
    q = tl.load(base[None, :] + offs_m[:, None].to(tl.int64) * s_qn, mask=md_mask, other=0.0)
    do = tl.load(do_ptr + b * s_db + offs_m[:, None].to(tl.int64) * s_dn + (h * HD + offs_d)[None, :] * s_dc,
                 mask=md_mask, other=0.0).to(q.dtype)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * N + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_off = (pid_bh.to(tl.int64) * N + offs_m) * N
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kv_mask = mask_d[:, None] & mask_n[None, :]
        kt = tl.load(base[:, None] + A * s_qc + offs_n[None, :].to(tl.int64) * s_qn, mask=kv_mask, other=0.0)
        vt = tl.load(base[:, None] + 2 * A * s_qc + offs_n[None, :].to(tl.int64) * s_qn, mask=kv_mask, other=0.0)
        p = tl.exp2(_dot(q, kt, DOT_F32, PREC) * qk_scale - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = _dot(do, vt, DOT_F32, PREC)
        if DROPOUT:
            kept = keep(seed_ptr, 0, row_off[:, None] + offs_n[None, :], p_drop)
            dp = tl.where(kept, dp / (1.0 - p_drop), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(q.dtype), tl.trans(kt), DOT_F32, PREC)
    tl.store(dqkv_ptr + b * s_gb + offs_m[:, None].to(tl.int64) * s_gn + (h * HD + offs_d)[None, :] * s_gc,
             (dq * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=md_mask)


MAX_HEAD_DIM = 64  # the largest BLOCK_D whose configs are compiled and checked for spills (EIT's are <= 33)


def block_d(head_dim: int) -> int:
    """The in-kernel head-dimension block: a power of 2, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_options(dtype) -> dict:
    """fp32 multiplies in IEEE fp32 (no TF32: the reference is fp32); bf16 in fp32 under the interpreter."""
    import torch
    return {"DOT_F32": INTERPRET and dtype == torch.bfloat16,
            "PREC": "ieee" if dtype == torch.float32 else "tf32"}


def tiles(dtype) -> dict:
    """Tile sizes and warps per input dtype, chosen so no config spills registers (see the AOT test):
    fp32 runs IEEE dots on FMAs and needs smaller tiles than fp16/bf16 tensor cores."""
    import torch
    if dtype == torch.float32:  # deeper pipelines make ptxas spill a few bytes in fp32 (sm_80)
        return dict(FWD_M=32, FWD_N=32, BWD_M=32, BWD_N=32, WARPS=4, FWD_STAGES=1, BWD_STAGES=2)
    # 16-bit: dK/dV over 64 keys with dropout needs more than 255 registers on sm_80, so 32
    return dict(FWD_M=64, FWD_N=64, BWD_M=32, BWD_N=32, WARPS=8, FWD_STAGES=3, BWD_STAGES=3)


DELTA_BLOCK_M = 32


def launch_attention_backward(qkv, o, do, lse, seed, dqkv, num_heads: int, p_drop: float, wrap=lambda k: k):
    """dqkv (B, N, 3A) from dO (B, N, A): delta, then dK/dV per key slab, then dQ per query slab."""
    import torch
    B, N, A3 = qkv.shape
    A = A3 // 3
    HD = A // num_heads
    BD = block_d(HD)
    delta = torch.empty((B, num_heads, N), device=qkv.device, dtype=torch.float32)
    wrap(attn_bwd_delta_kernel)[(B * num_heads, triton.cdiv(N, DELTA_BLOCK_M))](
        o, do, delta, N, num_heads, HD, *o.stride(), *do.stride(), BLOCK_M=DELTA_BLOCK_M, BLOCK_D=BD, num_warps=4)
    sm_scale = HD ** -0.5
    t = tiles(qkv.dtype)
    common = dict(BLOCK_M=t["BWD_M"], BLOCK_N=t["BWD_N"], BLOCK_D=BD, DROPOUT=p_drop > 0,
                  num_warps=t["WARPS"], num_stages=t["BWD_STAGES"], **dot_options(qkv.dtype))
    args = (qkv, do, lse, delta, dqkv, seed, N, num_heads, A, HD, *qkv.stride(), *do.stride(), *dqkv.stride(),
            sm_scale, sm_scale * LOG2E, p_drop)
    wrap(attn_bwd_dkdv_kernel)[(B * num_heads, triton.cdiv(N, t["BWD_N"]))](*args, **common)
    wrap(attn_bwd_dq_kernel)[(B * num_heads, triton.cdiv(N, t["BWD_M"]))](*args, **common)
