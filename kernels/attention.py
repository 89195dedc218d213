"""Flash-style multi-head attention, forward and backward, on heads padded to HP channels in memory.

Layouts (all contiguous): qkv and dqkv (B, N, 3, H, HP); o and dO (B, N, H, HP); lse and delta (B, H, N)
fp32. HP, the head size rounded up to a multiple of 8, is a constexpr, so every row offset is a multiple of
8 elements and the compiler can prove 16-byte alignment: the 16-bit loads are vectors, which the
pipeliner turns into cp.async (docs/design.md section 6). The padding columns are zero (the qkv GEMM runs
on a zero-padded weight), so they change neither q.k nor o, and their gradients come out zero.

Online softmax: no N x N matrix ever reaches memory; any N (masked tails). In-kernel the head dimension is
BLOCK_D = next power of 2 >= max(HP, 16). lse is in log2 units (the kernels use exp2). Dropout on the
probabilities comes from dropout.keep at offset ((b*H + h)*N + i)*N + j; the forward also stores the keep
decisions as bits, (B*H, N, NW) int32 words, NW = ceil(N / 32), bit j % 32 of word j // 32 of row i, so the
backward reads N^2 / 8 bytes per head instead of running the counter-based generator again (about 60
integer operations per element: more than the exponential, and more registers than the tile leaves).

Backward, one launch per (batch, head) program (`attn_bwd_kernel`): delta = rowsum(dO * O) first, then
for each key slab dK and dV over all queries, with dQ from the same probabilities, so every exponential
is computed once. dQ is summed over key slabs in registers when all queries fit one slab (N <= BLOCK_M),
else in an fp32 scratch that only this program touches (read-modify-write, in the same order every run):
deterministic, no atomics.
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
def _rng_index(pid_bh, RNG64: tl.constexpr):
    # Dropout offsets ((b*H + h)*N + i)*N + j in int32 when they fit (fewer registers; dropout.keep gives the
    # same bits for the same value in either width).
    if RNG64:
        return pid_bh.to(tl.int64)
    return pid_bh


@triton.jit
def attn_fwd_tile(qkv_ptr, o_ptr, lse_ptr, bits_ptr, seed_ptr, pid_m, pid_bh, N, H, qk_scale, p_drop,
                  HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DROPOUT: tl.constexpr, RNG64: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """One BLOCK_M slab of queries of one (batch, head): o and lse for those rows."""
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    s_n = 3 * H * HP  # qkv row stride: a multiple of 8 since HP is
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HP
    q_base = qkv_ptr + b * N * s_n + h * HP
    q = tl.load(q_base + offs_m[:, None] * s_n + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row_off = (_rng_index(pid_bh, RNG64) * N + offs_m) * N
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kv_mask = mask_d[:, None] & mask_n[None, :]
        kv_off = offs_n[None, :] * s_n + offs_d[:, None]
        kt = tl.load(q_base + H * HP + kv_off, mask=kv_mask, other=0.0)
        qk = _dot(q, kt, DOT_F32, PREC) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            kept = keep(seed_ptr, 0, row_off[:, None] + offs_n[None, :], p_drop)
            p = tl.where(kept, p / (1.0 - p_drop), 0.0)
            _store_bits(bits_ptr, kept & mask_n[None, :], pid_bh, offs_m, start_n, N, BLOCK_M, BLOCK_N)
        vt = tl.load(q_base + 2 * H * HP + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), tl.trans(vt), DOT_F32, PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptrs = o_ptr + b * N * (H * HP) + h * HP + offs_m[:, None] * (H * HP) + offs_d[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _store_bits(bits_ptr, kept, pid_bh, offs_m, start_n, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pack a [BLOCK_M, BLOCK_N] keep mask (BLOCK_N a multiple of 32, start_n of 32) into its words."""
    NW = tl.cdiv(N, 32)
    sh = (tl.arange(0, BLOCK_N) % 32).to(tl.uint32)
    bits = tl.sum(tl.reshape(kept.to(tl.uint32) << sh[None, :], [BLOCK_M, BLOCK_N // 32, 32]), 2)
    w = start_n // 32 + tl.arange(0, BLOCK_N // 32)
    ptrs = bits_ptr + (pid_bh.to(tl.int64) * N + offs_m[:, None]) * NW + w[None, :]
    tl.store(ptrs, bits.to(tl.int32, bitcast=True), mask=(offs_m < N)[:, None] & (w < NW)[None, :])


@triton.jit
def _load_gain_t(bits_ptr, pid_bh, offs_m, start_n, N, p_drop, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_N keys, BLOCK_M queries]: 1 / (1 - p) where the forward kept the probability, else 0."""
    NW = tl.cdiv(N, 32)
    w = start_n // 32 + tl.arange(0, BLOCK_N // 32)
    words = tl.load(bits_ptr + (pid_bh.to(tl.int64) * N + offs_m[None, :]) * NW + w[:, None],
                    mask=(offs_m < N)[None, :] & (w < NW)[:, None], other=0).to(tl.uint32, bitcast=True)
    words = tl.reshape(tl.broadcast_to(words[:, None, :], [BLOCK_N // 32, 32, BLOCK_M]), [BLOCK_N, BLOCK_M])
    sh = (tl.arange(0, BLOCK_N) % 32).to(tl.uint32)
    return tl.where(((words >> sh[:, None]) & 1) != 0, 1.0 / (1.0 - p_drop), 0.0)


@triton.jit
def attn_bwd_kernel(qkv_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, dq_ptr, bits_ptr, dbias_ptr,
                    N, H, sm_scale, qk_scale, p_drop,
                    HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    ONE_Q_BLOCK: tl.constexpr, DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """dQ, dK, dV of one (batch, head) into dqkv, and their column sums (the qkv bias gradient's share of
    this batch element) into dbias (B*H, 3, HP) fp32. dq_ptr: fp32 scratch (B*H, N, HP), unused if
    ONE_Q_BLOCK."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    s_n = 3 * H * HP
    s_o = H * HP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HP
    q_base = qkv_ptr + b * N * s_n + h * HP
    g_base = dqkv_ptr + b * N * s_n + h * HP
    o_base = b * N * s_o + h * HP  # int64; offsets inside one (batch, head) are int32 (the launcher checks)
    lse_base = lse_ptr + pid_bh.to(tl.int64) * N
    delta_base = delta_ptr + pid_bh.to(tl.int64) * N
    dq_base = dq_ptr + pid_bh.to(tl.int64) * N * HP
    # delta = rowsum(dO * O), for every query of this head (dropout leaves it unchanged)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        md = (offs_m < N)[:, None] & mask_d[None, :]
        ptrs = offs_m[:, None] * s_o + offs_d[None, :]
        o = tl.load(o_ptr + o_base + ptrs, mask=md, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + o_base + ptrs, mask=md, other=0.0).to(tl.float32)
        tl.store(delta_base + offs_m, tl.sum(o * do, 1), mask=offs_m < N)
    tl.debug_barrier()  # delta is read back by other threads
    if ONE_Q_BLOCK:
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_m[:, None] * s_n + offs_d[None, :], mask=md, other=0.0)
        do = tl.load(do_ptr + o_base + offs_m[:, None] * s_o + offs_d[None, :], mask=md, other=0.0).to(q.dtype)
        lse = tl.load(lse_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            dq += _bwd_key_slab(q_base, g_base, bits_ptr, q, do, lse, delta, mask_m, offs_m, start_n, pid_bh,
                                N, H, s_n, sm_scale, qk_scale, p_drop, HP, BLOCK_M, BLOCK_N, BLOCK_D, DROPOUT,
                                DOT_F32, PREC)
        tl.store(g_base + offs_m[:, None] * s_n + offs_d[None, :], (dq * sm_scale).to(dqkv_ptr.dtype.element_ty),
                 mask=md)
    else:
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            nd = mask_n[:, None] & mask_d[None, :]
            kv_off = offs_n[:, None] * s_n + offs_d[None, :]
            k = tl.load(q_base + H * HP + kv_off, mask=nd, other=0.0)
            v = tl.load(q_base + 2 * H * HP + kv_off, mask=nd, other=0.0)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            not_first = start_n > 0
            last = start_n + BLOCK_N >= N
            for start_m in range(0, N, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                mask_m = offs_m < N
                md = mask_m[:, None] & mask_d[None, :]
                q = tl.load(q_base + offs_m[:, None] * s_n + offs_d[None, :], mask=md, other=0.0)
                do = tl.load(do_ptr + o_base + offs_m[:, None] * s_o + offs_d[None, :], mask=md,
                             other=0.0).to(q.dtype)
                lse = tl.load(lse_base + offs_m, mask=mask_m, other=0.0)
                delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
                pt, dst = _bwd_scores(k, v, q, do, lse, delta, mask_m, offs_m, start_n, pid_bh, bits_ptr, N,
                                      qk_scale, p_drop, BLOCK_M, BLOCK_N, DROPOUT, DOT_F32, PREC)
                dv += _dot(pt.to(v.dtype), do, DOT_F32, PREC)
                dk += _dot(dst.to(k.dtype), q, DOT_F32, PREC)
                dq_part = _dot(tl.trans(dst.to(k.dtype)), k, DOT_F32, PREC)
                acc_ptrs = dq_base + offs_m[:, None] * HP + offs_d[None, :]
                dq_part += tl.load(acc_ptrs, mask=md & not_first, other=0.0)
                tl.store(acc_ptrs, dq_part, mask=md & (start_n + BLOCK_N < N))
                tl.store(g_base + offs_m[:, None] * s_n + offs_d[None, :],
                         (dq_part * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=md & last)
            tl.store(g_base + H * HP + kv_off, (dk * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=nd)
            tl.store(g_base + 2 * H * HP + kv_off, dv.to(dqkv_ptr.dtype.element_ty), mask=nd)
            tl.debug_barrier()  # this slab's dQ partials are read back by other threads
    # The bias gradient's share of this (batch, head): column sums of what was stored, read back (from L2)
    # rather than carried through the loops, where every register is taken.
    tl.debug_barrier()
    dqb = tl.zeros([BLOCK_D], tl.float32)
    dkb = tl.zeros([BLOCK_D], tl.float32)
    dvb = tl.zeros([BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        ptrs = g_base + offs_m[:, None] * s_n + offs_d[None, :]
        md = (offs_m < N)[:, None] & mask_d[None, :]
        dqb += tl.sum(tl.load(ptrs, mask=md, other=0.0).to(tl.float32), 0)
        dkb += tl.sum(tl.load(ptrs + H * HP, mask=md, other=0.0).to(tl.float32), 0)
        dvb += tl.sum(tl.load(ptrs + 2 * H * HP, mask=md, other=0.0).to(tl.float32), 0)
    bias = dbias_ptr + pid_bh.to(tl.int64) * 3 * HP + offs_d
    tl.store(bias, dqb, mask=mask_d)
    tl.store(bias + HP, dkb, mask=mask_d)
    tl.store(bias + 2 * HP, dvb, mask=mask_d)


@triton.jit
def _bwd_scores(k, v, q, do, lse, delta, mask_m, offs_m, start_n, pid_bh, bits_ptr, N, qk_scale, p_drop,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DROPOUT: tl.constexpr, DOT_F32: tl.constexpr,
                PREC: tl.constexpr):
    """(P^T after dropout, dS^T) of a key slab x query slab, keys along rows: dS = P * (dP - delta)."""
    pt = tl.exp2(_dot(k, tl.trans(q), DOT_F32, PREC) * qk_scale - lse[None, :])
    pt = tl.where(mask_m[None, :], pt, 0.0)
    if DROPOUT:  # dS = P * (dP * gain - delta) = P_dropped * dP - P * delta; the gain dies before dP exists
        pdt = pt * _load_gain_t(bits_ptr, pid_bh, offs_m, start_n, N, p_drop, BLOCK_M, BLOCK_N)
        dpt = _dot(v, tl.trans(do), DOT_F32, PREC)
        dst = pdt * dpt - pt * delta[None, :]
    else:
        dpt = _dot(v, tl.trans(do), DOT_F32, PREC)
        dst = pt * (dpt - delta[None, :])
        pdt = pt
    return pdt, dst


@triton.jit
def _bwd_key_slab(q_base, g_base, bits_ptr, q, do, lse, delta, mask_m, offs_m, start_n, pid_bh, N, H, s_n,
                  sm_scale, qk_scale, p_drop, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """dK, dV of one key slab against all queries (one query slab), stored; returns its dQ part."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nd = (offs_n < N)[:, None] & (offs_d < HP)[None, :]
    kv_off = offs_n[:, None] * s_n + offs_d[None, :]
    k = tl.load(q_base + H * HP + kv_off, mask=nd, other=0.0)
    v = tl.load(q_base + 2 * H * HP + kv_off, mask=nd, other=0.0)
    pt, dst = _bwd_scores(k, v, q, do, lse, delta, mask_m, offs_m, start_n, pid_bh, bits_ptr, N, qk_scale,
                          p_drop, BLOCK_M, BLOCK_N, DROPOUT, DOT_F32, PREC)
    dv = _dot(pt.to(v.dtype), do, DOT_F32, PREC)
    dk = _dot(dst.to(k.dtype), q, DOT_F32, PREC)
    tl.store(g_base + H * HP + kv_off, (dk * sm_scale).to(g_base.dtype.element_ty), mask=nd)
    tl.store(g_base + 2 * H * HP + kv_off, dv.to(g_base.dtype.element_ty), mask=nd)
    return _dot(tl.trans(dst.to(k.dtype)), k, DOT_F32, PREC)


def rng64(heads: int, n: int) -> bool:
    """Whether the attention dropout offsets need 64 bits."""
    return heads * n * n >= 2 ** 31


def block_d(hp: int) -> int:
    """The in-kernel head-dimension block: a power of 2, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(hp))


def dot_options(dtype) -> dict:
    """fp32 multiplies in IEEE fp32 (no TF32: the reference is fp32); bf16 in fp32 under the interpreter."""
    import torch
    return {"DOT_F32": INTERPRET and dtype == torch.bfloat16,
            "PREC": "ieee" if dtype == torch.float32 else "tf32"}


def launch_attention_backward(qkv, o, do, lse, bits, dqkv, head_dim: int, p_drop: float, cfg: dict,
                              wrap=lambda k: k):
    """dqkv (B, N, 3, H, HP) from dO (B, N, H, HP): one program per (batch, head); returns the qkv bias
    gradient (3, H, HP) fp32 (summed over the batch in a fixed order). bits: the forward's keep bits
    (dropout) or any tensor. cfg: BLOCK_M, BLOCK_N, num_warps, num_stages (ONE_Q_BLOCK follows from
    N <= BLOCK_M)."""
    import torch
    B, N, _, H, HP = qkv.shape
    if N * 3 * H * HP >= 2 ** 31:  # the op refuses these first; a direct caller gets the same word
        raise ValueError("attention backward: offsets inside one (batch, head) must fit int32")
    delta = torch.empty((B, H, N), device=qkv.device, dtype=torch.float32)
    one = N <= cfg["BLOCK_M"]
    dq = delta if one else torch.empty((B * H, N, HP), device=qkv.device, dtype=torch.float32)
    dbias = torch.empty((B, H, 3, HP), device=qkv.device, dtype=torch.float32)
    sm_scale = head_dim ** -0.5
    wrap(attn_bwd_kernel)[(B * H,)](
        qkv, o, do, lse, delta, dqkv, dq, bits, dbias, N, H, sm_scale, sm_scale * LOG2E, p_drop,
        HP=HP, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d(HP), ONE_Q_BLOCK=one,
        DROPOUT=p_drop > 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **dot_options(qkv.dtype))
    return dbias.sum(0).transpose(0, 1)


def bits_shape(batch: int, heads: int, n: int) -> tuple:
    """The forward's dropout keep bits: (B*H, N, ceil(N/32)) int32."""
    return (batch * heads, n, -(-n // 32))
