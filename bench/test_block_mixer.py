"""The fused token mixer against its rivals: x + mix(norm1(x)) of one EIT block, forward and forward+backward.

Paths: the fused Triton mixer (CUDA only; skips elsewhere), the eager reference, PyTorch SDPA with the head
size zero-padded to a multiple of 8 (the best a user gets without us: EIT's head sizes 2..33 are mostly
not multiples of 8), and torch.compile of the reference. Shapes: eit_tiny at batch 64 (N = 362) and
eit_cifar at batch 256 (N = 65), one mid-depth layer each. On a GPU the runs are bf16 autocast and timed with
CUDA events too (extra_info["cuda_ms"]); on the CPU they are fp32 and only the reference paths run.

Beside the times, `test_modelled_traffic` counts the bytes each path moves per call (DESIGN.md section 5):
eager, every aten op's tensor inputs and outputs (views are free), counted with a TorchDispatchMode on meta
tensors; fused, the same count for its torch ops plus the bytes its Triton kernels load and store, modelled
per kernel (each kernel reads each input region once and writes each output once; re-reads within a kernel
are assumed to hit L2). Run: `python -m pytest bench/test_block_mixer.py -s`.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from eit_fast.configs import get_config
from eit_fast.models.eit import Block
from eit_fast.modules import fused_block
from eit_fast.modules.fused_block import FusedBlock

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
    side = cfg.grid_size
    return cfg, ref, fused, batch, (side, side)


def eager_mixer(blk, x, grid):
    return x + blk.mix(blk.norm1(x), grid)


def sdpa_mixer(blk, x, grid):
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
    o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)[..., :hd]
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
        run()  # warm-up (and compile)
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


# --- modelled traffic ------------------------------------------------------------------------------------

class ByteCounter(TorchDispatchMode):
    """Adds up the bytes every aten op reads (tensor arguments) and writes (tensor outputs); views and
    metadata ops move nothing. The fused ops are counted by `fused_kernel_bytes` instead."""

    FREE = {"aten.detach.default", "aten.empty.memory_format", "aten.empty_like.default",
            "aten.new_empty.default", "aten.empty_strided.default", "aten.lift_fresh.default"}

    def __init__(self, kernel_bytes):
        super().__init__()
        self.total, self.by_op, self.kernel_bytes = 0, {}, kernel_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if name.startswith("eit_fast."):
            n = self.kernel_bytes(name, args, out)
        elif func.is_view or name in self.FREE:
            n = 0
        else:
            flat = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            n = sum(t.numel() * t.element_size() for t in flat)
        self.total += n
        self.by_op[name] = self.by_op.get(name, 0) + n
        return out


def fused_kernel_bytes(name, args, out):
    """Bytes the fused mixer's kernels (and the torch matmuls inside its backward op) load and store."""
    nb = lambda t: t.numel() * t.element_size()
    if name == "eit_fast.block_mixer.default":
        x, y, w, qkv, pw, pb, scale, seed = args[:8]
        H = args[10]
        B, N, D = x.shape
        C = 0 if y is None else y.shape[-1]
        A = D - C
        xs, os_ = x.element_size(), out[0].element_size()
        conv = (B * N * C * (y.element_size() + xs + os_) + nb(w)) if C else 0  # read y, x; write out
        attn = 0
        if A:
            o_b = out[1].element_size()
            attn = nb(qkv) + B * N * A * o_b + nb(out[2])  # mixer tiles: read q,k,v; write o, lse
            attn += B * N * A * (o_b + xs + os_) + nb(pw) + nb(pb)  # proj GEMM: read o, x, W; write out
        return conv + attn + nb(scale) + nb(seed)
    if name == "eit_fast.block_mixer_backward.default":
        g, y, w, qkv, pw, o, lse, scale, seed = args[:9]
        B, N, D = g.shape
        C = 0 if y is None else y.shape[-1]
        A = D - C
        gs = g.element_size()
        n = 2 * nb(g)  # mixer_grad: read g, write gz
        if C:
            n += B * N * C * gs + nb(w) + nb(out[0])  # conv input grad: read gz, write dy
            splits = max(1, min(128, math.ceil(B * math.ceil(N / 16) / 4)))
            n += B * N * C * gs + nb(y) + splits * 9 * C * 4 * 2  # weight grad: read gz, y; partials + sum
        if A:
            ob = o.element_size()
            n += B * N * A * gs  # bias grad: read gz_a
            n += B * N * A * (gs + ob) + B * N * A * ob * 2 + nb(pw) * 2  # gz_a cast; gz_a^T o -> dW
            n += B * N * A * ob * 2 + nb(pw)  # do = gz_a W
            n += 2 * B * N * A * ob + nb(lse)  # delta: read o, do; write delta
            n += nb(qkv) + B * N * A * ob + 2 * nb(lse) + B * N * 2 * A * ob  # dk, dv
            n += nb(qkv) + B * N * A * ob + 2 * nb(lse) + B * N * A * ob  # dq
        return n
    raise KeyError(name)


def modelled_bytes(case, path, backward, dtype=torch.bfloat16, batch=None):
    """Bytes moved by one call of `path` on meta tensors of the case's shape in `dtype`."""
    cfg, ref, fused, b, grid = _blocks(case, device="meta", dtype=dtype)
    blk = fused if path == "fused" else ref
    x = torch.empty(batch or b, 1 + grid[0] * grid[1], cfg.embed_dim, device="meta", dtype=dtype,
                    requires_grad=backward)
    counter = ByteCounter(fused_kernel_bytes)
    with counter:
        out = PATHS[path](blk, x, grid)
        if backward:
            out.backward(torch.empty_like(out))
    return counter.total, counter.by_op


def test_modelled_traffic():
    """eager / fused bytes for one block's mixer, bf16; printed and checked to be a real saving."""
    lines = []
    for case in CASES:
        for backward in (False, True):
            eager, by_op = modelled_bytes(case, "eager", backward)
            fused, _ = modelled_bytes(case, "fused", backward)
            lines.append(f"{case:<16}{'fwd+bwd' if backward else 'fwd':<9}eager {eager / 1e6:9.1f} MB   fused "
                         f"{fused / 1e6:8.1f} MB   ratio {eager / fused:5.2f}")
            assert fused < eager
    print("\n" + "\n".join(lines))


def test_modelled_traffic_every_eit_tiny_layer():
    cfg = get_config("eit_tiny")
    lines, tot = [], [0, 0]
    for layer in range(cfg.depth):
        e, _ = modelled_bytes(("eit_tiny", layer, 64), "eager", False)
        f, _ = modelled_bytes(("eit_tiny", layer, 64), "fused", False)
        tot[0] += e
        tot[1] += f
        lines.append(f"eit_tiny b64 layer {layer} {cfg.split(layer)}: eager {e / 1e6:8.1f} MB fused {f / 1e6:7.1f} MB "
                     f"ratio {e / f:5.2f}")
    lines.append(f"all 8 mixers: eager {tot[0] / 1e9:.2f} GB fused {tot[1] / 1e9:.3f} GB ratio {tot[0] / tot[1]:.2f}")
    print("\n" + "\n".join(lines))
    assert tot[1] < tot[0]
