"""The fused token mixer against its rivals: x + mix(norm1(x)) of one EIT block, forward and forward+backward.

Paths: the fused Triton mixer (CUDA only; skips elsewhere), the eager reference, PyTorch SDPA with the head
size zero-padded to a multiple of 8 (the best a user gets without us: EIT's head sizes 2..33 are mostly
not multiples of 8), and torch.compile of the reference. Shapes: eit_tiny at batch 64 (N = 362) and
eit_cifar at batch 256 (N = 65), one mid-depth layer each. On a GPU the runs are bf16 autocast and timed with
CUDA events too (extra_info["cuda_ms"]); on the CPU they are fp32 and only the reference paths run.

Beside the times, the modelled time (docs/design.md section 6; eit_fast.perf_model, H100 datasheet limits):
every kernel's time is max(bytes / bandwidth, MMA FLOPs / tensor-core rate, FMA FLOPs / FMA rate,
exponentials / 3.9 T/s) and a path's time is the sum over its kernels. Eager and SDPA: every aten op is one
kernel (its tensor inputs and outputs are its bytes; matmuls count MMA FLOPs, softmax and exp count
exponentials), counted on meta tensors; SDPA is modelled as FlashAttention-2 (head size rounded up to its
32-multiple templates, dQ accumulated in fp32). Fused: the bytes each of its kernels loads from and stores to
device memory (re-reads of the same tile by neighbouring programs assumed to hit L2), its MMAs at the padded
tile sizes it really computes, its exponentials over whole tiles. The ideal floor: per block, the larger of
(x read, out written; backward: g and x read, dx written) / bandwidth, the unpadded GEMM and attention FLOPs
/ 990 TFLOP/s, and one exponential per score per pass / 3.9 T/s. All of these are *modelled*, not measured.
`python -m pytest bench/test_block_mixer.py -k modelled -s` prints the tables;
`python -m pytest bench/test_block_mixer.py -k speed` measures on a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from eit_fast.configs import get_config
from eit_fast.kernels import attention as attn_k
from eit_fast.models.eit import Block
from eit_fast.modules import fused_block
from eit_fast.modules.fused_block import FusedBlock
from eit_fast.ops import block_mixer as op
from eit_fast.perf_model import H100, Work, modelled_time, nbytes

CASES = {"eit_tiny_b64": ("eit_tiny", 3, 64), "eit_cifar_b256": ("eit_cifar", 1, 256)}
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


class _Holder(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.blocks = torch.nn.ModuleList([block])


def _blocks(case, device=DEVICE, dtype=torch.float32):
    name, layer, batch = CASES[case] if isinstance(case, str) else case
    cfg = get_config(name)
    ref = Block(cfg, layer, 0.0).to(device=device, dtype=dtype).eval()
    fused = Block(cfg, layer, 0.0).to(device=device, dtype=dtype).eval()
    fused.load_state_dict(ref.state_dict())
    fused_block.swap(_Holder(fused))
    assert type(fused) is FusedBlock
    side = cfg.grid_size
    return cfg, ref, fused, batch, (side, side)


def eager_mixer(blk, x, grid):
    return x + blk.mix(blk.norm1(x), grid)


def sdpa_mixer(blk, x, grid, attention=None):
    """The reference mixer with attention through F.scaled_dot_product_attention, head size zero-padded to
    a multiple of 8 (zero columns change neither q.k nor, after slicing, the output)."""
    y = blk.norm1(x)
    c, a = blk.conv_dim, blk.attn_dim
    parts = [blk.eit_t(y[..., :c], grid)] if c else []
    attn = blk.attn
    B, N, _ = x.shape
    hd = attn.head_dim
    pad = -hd % 8
    q, k, v = attn.qkv(y[..., c:]).reshape(B, N, 3, attn.num_heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    o = (attention or F.scaled_dot_product_attention)(q, k, v, scale=attn.scale)[..., :hd]
    parts.append(attn.proj(o.transpose(1, 2).reshape(B, N, a)))
    return x + torch.cat(parts, -1)


def fused_mixer(blk, x, grid):
    return blk.mix_residual(x, grid)


_compiled = {}


def compiled_mixer(blk, x, grid):
    key = id(blk)
    if key not in _compiled:
        _compiled[key] = torch.compile(lambda x: eager_mixer(blk, x, grid))
    return _compiled[key](x)


PATHS = {"fused": fused_mixer, "eager": eager_mixer, "sdpa_pad8": sdpa_mixer, "compile": compiled_mixer}


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(CASES))
def test_mixer_speed(benchmark, case, path, mode):
    if path == "fused" and not CUDA:
        pytest.skip("the fused mixer's Triton kernels need a CUDA GPU (interpreted they are not a speed test)")
    torch.manual_seed(0)
    cfg, ref, fused, batch, grid = _blocks(case)
    blk = fused if path == "fused" else ref
    if not CUDA and case == "eit_tiny_b64":
        batch = 8  # the CPU reference at batch 64 x 362 tokens takes minutes per round here
    x = torch.randn(batch, 1 + grid[0] * grid[1], cfg.embed_dim, device=DEVICE, requires_grad=mode != "forward")
    g = torch.randn_like(x)
    fn = PATHS[path]

    def run():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            out = fn(blk, x, grid)
        if mode == "forward_backward":
            out.backward(g)
        if CUDA:
            torch.cuda.synchronize()
        return out

    with torch.no_grad() if mode == "forward" else torch.enable_grad():
        run()  # warm-up (and compile, and the fused mixer's tile choice)
        benchmark.pedantic(run, rounds=10 if CUDA else 3, iterations=1)
        if CUDA:  # the same call timed on the device
            times = []
            for _ in range(20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            benchmark.extra_info["cuda_ms"] = sorted(times)[len(times) // 2]
    benchmark.extra_info.update(case=case, path=path, mode=mode, batch=batch, device=DEVICE)
    benchmark.extra_info["device_name"] = torch.cuda.get_device_name() if CUDA else "cpu"


# --- the modelled time -----------------------------------------------------------------------------------

MMA_OPS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default"}
EXP_OPS = {"aten._softmax.default", "aten._safe_softmax.default", "aten.exp.default", "aten.exp2.default"}
FREE = {"aten.detach.default", "aten.empty.memory_format", "aten.empty_like.default", "aten.new_empty.default",
        "aten.empty_strided.default", "aten.lift_fresh.default", "aten.new_empty_strided.default",
        "aten._unsafe_view.default"}


def _mm_flops(name, args, out):
    a, b = (args[1], args[2]) if name in ("aten.addmm.default", "aten.baddbmm.default") else (args[0], args[1])
    return 2 * out.numel() * a.shape[-1]


def _flash_attention(q, k, v, scale):
    """SDPA's flash kernel called directly, so the count on meta tensors sees one fused kernel, not the math
    fallback that meta tensors would take."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[0]


def _flash_work(name, args, out):
    """FlashAttention-2: q, k, v (and o, dO, lse) read once, outputs written once; MMAs at the head-size
    template (a multiple of 32); one exponential per score per pass; backward dQ accumulated in fp32."""
    q = args[1] if "backward" in name else args[0]
    B, H, N, hd = q.shape
    ht = -(-hd // 32) * 32
    io = sum(nbytes(t) for t in tree_leaves((args, out)) if isinstance(t, torch.Tensor) and t.numel() > 1)
    if "backward" in name:
        return Work(io + 2 * B * H * N * ht * 4, 5 * 2 * B * H * N * N * ht, exps=B * H * N * N)
    return Work(io, 2 * 2 * B * H * N * N * ht, exps=B * H * N * N)


def _tiles(n, block):
    return -(-n // block) * block


def fused_kernel_works(name, args, out) -> list[tuple[str, Work]]:
    """(kernel, Work) of each kernel (and torch GEMM) the fused op runs, from its shapes and first tile config."""
    if name == "eit_fast.block_mixer.default":
        x, norm_w, norm_b, conv_w, qkv_w, qkv_b, proj_w, proj_b, scale, seed = args[:10]
        H, p_attn, cd = args[12], args[14], args[17]
    else:
        g, x, norm_w, conv_w, qkv_w, proj_w = args[:6]
        H, p_attn, cd = args[18], args[19], args[22]
    B, N, D, C, A, H, HD, HP, AP, CP = op._dims(x, conv_w, qkv_w, H)
    M, cs, xs = B * N, torch.empty(0, dtype=cd).element_size(), x.element_size()
    K, BD = H * HP, attn_k.block_d(HP) if A else 0
    bits = B * H * N * -(-N // 32) * 4 if A and p_attn > 0 else 0
    w = []
    if name == "eit_fast.block_mixer.default":
        w.append(("layernorm_fwd", Work(M * D * xs + M * (CP * (C > 0) + AP) * cs + 8 * M + 8 * D)))
        if A:
            w.append(("qkv_gemm", Work(M * AP * cs + 3 * K * AP * cs + M * 3 * K * cs, 2 * M * AP * 3 * K)))
        f = op.configs("attn_fwd", cd, N, HP, p_attn > 0)[0]
        bm, bn = f["BLOCK_M"], f["BLOCK_N"]
        pairs = B * H * -(-N // bm) * -(-N // bn) if A else 0
        attn = Work(M * 4 * K * cs + B * H * N * 4 + bits, pairs * 2 * 2 * bm * bn * BD, exps=pairs * (bm * bn + bm))
        conv = Work(M * CP * cs + M * C * 2 * xs, fma_flops=2 * 9 * M * C) if C else Work()
        w.append(("mixer_fwd", attn + conv))
        if A:
            p = op.configs("proj", cd, N, HP, p_attn > 0)[0]
            mma = 2 * _tiles(M, p["BLOCK_M"]) * _tiles(A, p["BLOCK_N"]) * _tiles(K, p["BLOCK_K"])
            w.append(("proj_residual", Work(M * K * cs + A * K * cs + M * A * 2 * xs, mma)))
        return w
    gs = g.element_size()
    w.append(("mixer_grad", Work(M * D * gs + M * (C + A) * cs)))
    if C:
        w.append(("conv_bwd_input", Work(M * CP * cs + M * C * cs, fma_flops=2 * 9 * M * C)))
        w.append(("conv_bwd_weight", Work(2 * M * CP * cs, fma_flops=2 * 9 * M * C)))
    if A:
        w.append(("proj_dW_gemm", Work(M * A * cs + M * K * cs + A * K * cs, 2 * M * A * K)))
        w.append(("proj_dO_gemm", Work(M * A * cs + A * K * cs + M * K * cs, 2 * M * A * K)))
        b = op.configs("attn_bwd", cd, N, HP, p_attn > 0)[0]
        bm, bn = b["BLOCK_M"], b["BLOCK_N"]
        pairs = B * H * -(-N // bm) * -(-N // bn)
        w.append(("attn_bwd", Work(M * (3 + 2 + 3) * K * cs + 3 * B * H * N * 4 + bits, pairs * 5 * 2 * bm * bn * BD,
                                   exps=pairs * bm * bn)))
        w.append(("qkv_dW_gemm", Work(M * 3 * K * cs + M * AP * cs + 3 * K * AP * cs, 2 * M * 3 * K * AP)))
        w.append(("qkv_dy_gemm", Work(M * 3 * K * cs + 3 * K * AP * cs + M * AP * cs, 2 * M * 3 * K * AP)))
    w.append(("layernorm_bwd", Work(2 * M * D * xs + M * D * gs + M * (C + A) * cs + 8 * M)))
    return w


class WorkCounter(TorchDispatchMode):
    """(name, Work) of every kernel a region runs: aten ops one each, the fused ops by their kernels."""

    def __init__(self):
        super().__init__()
        self.works = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if name.startswith("eit_fast."):
            self.works += fused_kernel_works(name, args, out)
        elif name.startswith("aten._scaled_dot_product_flash_attention"):
            self.works.append((name, _flash_work(name, args, out)))
        elif not (func.is_view or name in FREE or name.startswith("prim.")):
            io = sum(nbytes(t) for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
            work = Work(io)
            if name in MMA_OPS:
                work.mma_flops = _mm_flops(name, args, out)
            elif name in EXP_OPS:
                work.exps = out.numel()
            elif name.startswith("aten.convolution"):  # the depthwise 3x3: CUDA cores
                work.fma_flops = 2 * 9 * out.numel() if name == "aten.convolution.default" else \
                    2 * 2 * 9 * args[1].numel()
            self.works.append((name, work))
        return out


def modelled(case, path, backward, dtype=torch.bfloat16):
    """(seconds, bytes, works) modelled for one call of `path` on `case` under `dtype` autocast: fp32
    parameters and residual, the matrix operands in `dtype` (fake tensors: nothing is computed)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    fn = {"eager": eager_mixer, "fused": fused_mixer,
          "sdpa_pad8": lambda b, x, g: sdpa_mixer(b, x, g, attention=_flash_attention)}[path]
    name, layer, batch = CASES[case] if isinstance(case, str) else case
    cfg = get_config(name)
    with FakeTensorMode():
        blk = Block(cfg, layer, 0.0).eval()
        if path == "fused":
            fused_block.swap(_Holder(blk))
        x = torch.empty(batch, cfg.num_tokens, cfg.embed_dim, requires_grad=backward)
        grid = cfg.grid_hw
        counter = WorkCounter()
        with torch.autocast("cpu", dtype=dtype), _CudaSoftmax(), counter:
            out = fn(blk, x, grid)
            if backward:
                out.backward(torch.empty_like(out))
    secs = sum(modelled_time(w, H100).seconds for _, w in counter.works)
    return secs, sum(w.bytes for _, w in counter.works), counter.works


class _CudaSoftmax(TorchFunctionMode):
    """CPU autocast (what runs without a GPU) leaves softmax in bf16; CUDA autocast, which the model is of,
    runs it in fp32: do as CUDA does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.softmax, torch.softmax, F.softmax) and torch.is_autocast_enabled("cpu") and \
                args[0].dtype in (torch.bfloat16, torch.float16):
            args = (args[0].float(), *args[1:])
        return func(*args, **kwargs)


def ideal(case, backward):
    """The floor of one mixer (docs/design.md section 6): max of bytes, MMA FLOPs and exponentials that any
    implementation must spend (unpadded; fp32 residual, bf16 operands)."""
    name, layer, batch = CASES[case] if isinstance(case, str) else case
    cfg = get_config(name)
    A, C = cfg.split(layer)
    B, N, D, H = batch, cfg.num_tokens, cfg.embed_dim, cfg.num_heads
    M = B * N
    bytes_ = M * D * 4 * (2 + (3 if backward else 0))
    gemm = 2 * M * A * 3 * A + 2 * M * A * A
    attn = 2 * 2 * B * N * N * A if A else 0
    mma = gemm + attn + ((2 * gemm + 5 * attn / 2) if backward else 0)
    exps = B * H * N * N * (2 if backward else 1) if A else 0
    return modelled_time(Work(bytes_, mma, fma_flops=2 * 9 * M * C * (3 if backward else 1), exps=exps), H100)


def _table(case, lines):
    out = {}
    for backward in (False, True):
        row = {p: modelled(case, p, backward) for p in ("eager", "sdpa_pad8", "fused")}
        fl = ideal(case, backward)
        out[backward] = (row, fl)
        label = f"{case if isinstance(case, str) else '%s l%d b%d' % case:<18}{'fwd+bwd' if backward else 'fwd':<8}"
        lines.append(label + "  ".join(f"{p} {s * 1e3:7.3f} ms {b / 1e6:7.1f} MB" for p, (s, b, _) in row.items())
                     + f"  ideal {fl.seconds * 1e3:7.3f} ms ({fl.bound})")
    return out


def test_modelled_time_per_block():
    """Modelled time and bytes of one block's mixer, bf16 autocast, per path; the fused path beats eager and
    SDPA-pad8 in time and bytes, and no path beats the floor."""
    lines = []
    for case in CASES:
        for backward, (row, fl) in _table(case, lines).items():
            assert row["fused"][0] < row["eager"][0] and row["fused"][0] < row["sdpa_pad8"][0], (case, backward)
            assert row["fused"][1] < row["eager"][1] and row["fused"][1] < row["sdpa_pad8"][1], (case, backward)
            assert all(s >= fl.seconds * 0.999 for s, _, _ in row.values()), (case, backward)
    print("\nmodelled on the H100 datasheet (not measured):\n" + "\n".join(lines))


def test_modelled_time_every_eit_tiny_layer():
    """eit_tiny's 8 mixers at batch 64, bf16: modelled forward+backward time and bytes of each path, the
    fused kernels' own breakdown, and the floor."""
    cfg = get_config("eit_tiny")
    lines, tot = [], {}
    per_kernel = {}
    for layer in range(cfg.depth):
        for backward, (row, fl) in _table(("eit_tiny", layer, 64), lines).items():
            for p, (s, b, works) in row.items():
                t = tot.setdefault((p, backward), [0.0, 0.0])
                t[0] += s
                t[1] += b
            t = tot.setdefault(("ideal", backward), [0.0, 0.0])
            t[0] += fl.seconds
            if backward:
                for k, w in row["fused"][2]:
                    per_kernel[k] = per_kernel.get(k, 0.0) + modelled_time(w, H100).seconds
    for backward in (False, True):
        lines.append(f"all 8 mixers {'fwd+bwd' if backward else 'fwd':<8}" + "  ".join(
            f"{p} {tot[(p, backward)][0] * 1e3:.3f} ms" + (f" {tot[(p, backward)][1] / 1e9:.2f} GB" if p != "ideal"
                                                          else "") for p in ("eager", "sdpa_pad8", "fused", "ideal")))
    lines.append("fused fwd+bwd by kernel: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in
                                                         sorted(per_kernel.items(), key=lambda kv: -kv[1])))
    print("\nmodelled on the H100 datasheet (not measured):\n" + "\n".join(lines))
    assert tot[("fused", True)][0] < tot[("sdpa_pad8", True)][0] < tot[("eager", True)][0]
    assert tot[("ideal", True)][0] <= tot[("fused", True)][0]
    assert math.isfinite(tot[("fused", True)][0])
