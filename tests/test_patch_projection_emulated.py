"""The real CUDA kernels of the patch projection (csrc/cuda/patch_projection_kernels.cuh), compiled by g++
against csrc/cuda/emulation.h and run on the CPU, against F.conv2d + F.max_pool2d: output, argmax, dW, dx, for
every math path (exact fp32, tf32, bf16 and fp16 tensor cores).

Every run executes each launch three times, with the threads (and blocks) of every block scheduled in
ascending, descending and seeded random order; the emulator exits non-zero when the forward output, the
argmax or the weight gradient differ in any bit between the orders (a missing barrier), and the tests
below also remove each barrier and cp.async wait in turn and require the result to fail.
"""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp" / "emulated_kernels.cpp"
CXX = shutil.which("g++") or shutil.which("c++")
FLAGS = ["-std=c++20", "-O2", "-pthread", "-fno-strict-aliasing", "-fwrapv", "-Wall", "-Werror"]
LIMIT = 2**31 - 1
TORCH_DTYPE = {"f32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    exe = tmp_path_factory.mktemp("emu") / "emulated_kernels"
    r = subprocess.run([CXX, *FLAGS, "-o", str(exe), str(SOURCE)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return exe


def test_self_check_against_direct_loops(emulator):
    r = subprocess.run([str(emulator)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") >= 14 and "FAIL" not in r.stdout


def encode(t, math):
    """The raw bytes the kernels read: fp32 for f32/tf32, the 16-bit bits for bf16/f16."""
    t = t.detach().to(TORCH_DTYPE[math]).contiguous()
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().tobytes()


def run(emulator, tmp_path, math, case, x, w, b, grad, layout="nchw", limit=LIMIT, env=None):
    """Runs the emulated kernels on x (B, C, H, W), w, b, grad; returns (rc, stdout+stderr, outputs)."""
    B, C, H, W = x.shape
    D, _, k, _ = w.shape
    stride, pool = case
    xin = x.permute(0, 2, 3, 1) if layout == "nhwc" else x
    for name, t in (("x", xin), ("w", w), ("b", b), ("grad", grad)):
        (tmp_path / f"{name}.bin").write_bytes(encode(t, math))
    args = [str(emulator), "run", math, layout, *map(str, (B, C, H, W, D, k, stride, k // 2, pool, limit)),
            str(tmp_path), str(tmp_path)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    if r.returncode != 0:
        return r.returncode, r.stdout + r.stderr, None
    n = grad.shape[0] * grad.shape[1]
    raw = np.fromfile(tmp_path / "out.bin", dtype=np.float32 if TORCH_DTYPE[math] == torch.float32 else np.int16)
    out = torch.from_numpy(raw.copy())
    out = out.view(TORCH_DTYPE[math]) if out.dtype == torch.int16 else out
    dx = torch.from_numpy(np.fromfile(tmp_path / "dx.bin", dtype=np.float32))
    dx = dx.view(B, H, W, C).permute(0, 3, 1, 2) if layout == "nhwc" else dx.view(B, C, H, W)
    return 0, r.stdout, {
        "out": out.view(grad.shape).float(),
        "argmax": torch.from_numpy(np.fromfile(tmp_path / "argmax.bin", dtype=np.uint8)).view(grad.shape).long(),
        "dw": torch.from_numpy(np.fromfile(tmp_path / "dw.bin", dtype=np.float32)).view(w.shape),
        "dx": dx,
    }


def torch_reference(x, w, b, grad, stride, pool, dtype):
    """conv + max-pool in `dtype` through PyTorch: tokens, window argmax, dx, dw (as float64)."""
    xi, wi, bi = (t.detach().to(dtype).requires_grad_() for t in (x, w, b))
    conv = F.conv2d(xi, wi, bi, stride, w.shape[-1] // 2)
    pooled, idx = F.max_pool2d(conv, pool, pool, return_indices=True)
    out = pooled.flatten(2).transpose(1, 2)
    out.backward(grad.to(dtype))
    Wc = conv.shape[3]
    argmax = ((idx // Wc % pool) * pool + idx % Wc % pool).flatten(2).transpose(1, 2)
    return {"out": out.detach().double(), "argmax": argmax, "dx": xi.grad.double(), "dw": wi.grad.double()}


def rel(a, ref):
    assert not torch.isnan(a).any(), "NaN in the result (an unwritten or poisoned element)"
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def routed_gradients(x, w, b, grad, argmax, stride, pool, dtype):
    """dx, dw of conv + pool in `dtype` with the pool's routing given (argmax): separates the arithmetic from
    the choice of window at near-ties, which low precision makes differently."""
    xi, wi, bi = (t.detach().to(dtype).requires_grad_() for t in (x, w, b))
    conv = F.conv2d(xi, wi, bi, stride, w.shape[-1] // 2)
    B, D, Hc, Wc = conv.shape
    Hp, Wp = Hc // pool, Wc // pool
    t = torch.arange(Hp * Wp)
    rows = (t // Wp).view(1, -1, 1) * pool + argmax // pool
    cols = (t % Wp).view(1, -1, 1) * pool + argmax % pool
    g = torch.zeros(B, D, Hc * Wc, dtype=dtype)
    g.scatter_(2, (rows * Wc + cols).transpose(1, 2), grad.to(dtype).transpose(1, 2))
    dx, dw = torch.autograd.grad(conv, (xi, wi), g.view(B, D, Hc, Wc))
    return {"dx": dx.double(), "dw": dw.double()}


def inputs(B, C, H, W, D, k, math, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    w = torch.randn(D, C, k, k, generator=g) * (2.0 / (C * k * k)) ** 0.5
    b = torch.randn(D, generator=g)
    # values as the kernels see them, so that the fp64 reference computes the same function
    return tuple(t.to(TORCH_DTYPE[math]).double() for t in (x, w, b))


def check_against_torch(emulator, tmp_path, math, shape, layout="nchw", limit=LIMIT):
    B, C, H, W, D, k, stride, pool = shape
    x, w, b = inputs(B, C, H, W, D, k, math)
    conv = F.conv2d(x, w, b, stride, k // 2)
    tokens = F.max_pool2d(conv, pool, pool).flatten(2).transpose(1, 2)
    grad = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = grad.to(TORCH_DTYPE[math]).double()
    ref = torch_reference(x, w, b, grad, stride, pool, torch.float64)
    rc, log, got = run(emulator, tmp_path, math, (stride, pool), x, w, b, grad, layout, limit)
    assert rc == 0, log
    assert "DIFFERS" not in log, log
    ours = routed_gradients(x, w, b, grad, got["argmax"], stride, pool, torch.float64)
    errs = {"out": rel(got["out"], ref["out"]), "dw": rel(got["dw"], ours["dw"]), "dx": rel(got["dx"], ours["dx"])}
    if math == "f32":  # exact fp32 arithmetic
        tol = {key: 1e-5 for key in errs}
    elif math == "tf32":  # tf32 has a 10-bit mantissa: a tolerance of its own
        tol = {"out": 1e-3, "dw": 2e-3, "dx": 2e-3}
    else:  # no worse than twice PyTorch's own error in that precision, plus a small floor
        low = torch_reference(x, w, b, grad, stride, pool, TORCH_DTYPE[math])
        theirs = routed_gradients(x, w, b, grad, low["argmax"], stride, pool, torch.float64)
        tol = {"out": 2 * rel(low["out"], ref["out"]) + 1e-3, "dw": 2 * rel(low["dw"], theirs["dw"]) + 1e-3,
               "dx": 2 * rel(low["dx"], theirs["dx"]) + 1e-3}
    assert all(errs[key] < tol[key] for key in errs), (errs, tol)
    agree = (got["argmax"] == ref["argmax"]).double().mean().item()
    assert agree > (0.999 if math == "f32" else 0.98), agree
    return errs


# (B, C, H, W, D, k, stride, pool): the 16/4/3 stem (vectorised cp.async gather: W % 4 == 0), the 3/1/4 stem
# (element-wise gather), odd non-square sizes, D off every tile multiple and past one tile, batch 1.
SHAPES = {
    "mini_44x40_D21": (1, 3, 44, 40, 21, 16, 4, 3),
    "mini_odd_45x38_D33": (2, 3, 45, 38, 33, 16, 4, 3),
    "cifar_13x11_D70": (2, 3, 13, 11, 70, 3, 1, 4),
    "cifar_32_D130": (1, 3, 32, 32, 130, 3, 1, 4),
    "k1_9x7_D5": (1, 2, 9, 7, 5, 1, 1, 2),
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("math", ["f32", "tf32", "bf16", "f16"])
def test_emulated_kernels_match_pytorch(emulator, tmp_path, math, shape):
    check_against_torch(emulator, tmp_path, math, SHAPES[shape])


@pytest.mark.parametrize("math", ["f32", "bf16"])
@pytest.mark.parametrize("shape", ["mini_44x40_D21", "cifar_13x11_D70"])
def test_emulated_channels_last_input(emulator, tmp_path, math, shape):
    # channels_last: patch elements run (kh, kw, c); the 16/4/3 stem's 48-element runs take the vector path
    check_against_torch(emulator, tmp_path, math, SHAPES[shape], layout="nhwc")


@pytest.mark.parametrize("math", ["bf16", "tf32"])
@pytest.mark.parametrize("width", [250, 330, 400, 464])
def test_emulated_released_widths(emulator, tmp_path, width, math):
    # The released D: 250 takes the 128-column tile, 330 the 112-column one (7 n8 fragments per warp: an odd
    # count, the last loaded with ldmatrix.x2), 400 and 464 the 80-column one.
    check_against_torch(emulator, tmp_path, math, (1, 3, 12, 12, width, 3, 1, 4))


def test_emulated_batch_split_into_32_bit_launches(emulator, tmp_path):
    # A small index limit makes the launchers split the batch as they do past 2^31 elements: 3 launches
    # here, each with its own slice of the weight gradient's reduction.
    check_against_torch(emulator, tmp_path, "f32", (5, 3, 16, 16, 20, 3, 1, 4), limit=1300)


def test_emulated_ties_go_to_the_first_maximum(emulator, tmp_path):
    # Small integers: every conv value is exact in bf16 and fp32, so equal windows tie exactly and the
    # argmax must be PyTorch's (the first maximum in row-major window order) for every math path.
    x = torch.randint(0, 2, (2, 3, 1, 1)).double().expand(2, 3, 21, 19).contiguous()
    x[:, :, ::5] = 0
    w, b = torch.randint(-2, 3, (70, 3, 3, 3)).double(), torch.randint(-2, 3, (70,)).double()
    conv = F.conv2d(x, w, b, 1, 1)
    ref = torch_reference(x, w, b, torch.randn(2, 20, 70).double(), 1, 4, torch.float64)
    windows = conv[:, :, :20, :16].unfold(2, 4, 4).unfold(3, 4, 4).flatten(-2)
    assert ((windows == windows.max(-1, keepdim=True).values).sum(-1) > 1).float().mean() > 0.5
    for math in ("f32", "tf32", "bf16", "f16"):
        rc, log, got = run(emulator, tmp_path, math, (1, 4), x, w, b, torch.randn(2, 20, 70).double())
        assert rc == 0, log
        assert torch.equal(got["argmax"], ref["argmax"]), math
        assert torch.equal(got["out"].double(), ref["out"]), math


def test_emulated_nan_propagates_like_max_pool(emulator, tmp_path):
    x, w, b = inputs(2, 3, 24, 24, 5, 3, "f32")
    x[0, 1, 5, 7] = x[1, 0, 20, 3] = float("nan")
    grad = torch.randn(2, 36, 5).double()
    ref = torch_reference(x, w, b, grad, 1, 4, torch.float64)
    rc, log, got = run(emulator, tmp_path, "f32", (1, 4), x, w, b, grad)
    assert rc == 0, log
    assert torch.isnan(ref["out"]).any()
    for key in ("out", "dw", "dx"):
        torch.testing.assert_close(got[key].double(), ref[key], equal_nan=True, rtol=1e-5, atol=1e-5)


def test_emulated_16_bit_types_round_like_torch(emulator, tmp_path):
    # The emulator's own bf16/fp16 types must convert as PyTorch does: ties to even, subnormals, overflow.
    v = torch.cat([torch.randn(2000) * 10.0 ** torch.randint(-8, 6, (2000,)).float(),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e-8, 6e-8, 3e-5, 1 + 2**-8, 1 + 3 * 2**-8,
                                 float("inf"), -float("inf"), 3.4e38])])
    (tmp_path / "in.bin").write_bytes(v.numpy().astype(np.float32).tobytes())
    for math, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        r = subprocess.run([str(emulator), "convert", math, str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        got = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.int16))
        assert torch.equal(got, v.to(dtype).view(torch.int16)), math


@pytest.mark.parametrize("case, message", [
    (0, "thread 17 (warp 0 lane 17, 0 barriers passed, exited)"),
    (1, "a thread exited while others wait at __syncthreads"),
    (2, "lane 5, 0 barriers passed, exited"),
])
def test_watchdog_names_the_thread_that_misses_a_barrier(emulator, case, message):
    r = subprocess.run([str(emulator), "watchdog", str(case)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "emulation error:" in r.stderr and message in r.stderr, r.stdout + r.stderr


def sites(emulator):
    r = subprocess.run([str(emulator), "sites"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [line.split(" ", 1) for line in r.stdout.splitlines()]


def test_every_barrier_and_wait_is_needed(emulator, tmp_path):
    # Mutation test: remove each __syncthreads and each cp.async wait of the three kernels in turn (the
    # emulator turns the one at that source line into a no-op); the result must then fail: orders disagree,
    # the watchdog stops the run, or the values are off the reference.
    found = sites(emulator)
    kinds = [kind for _, kind in found]
    assert kinds.count("barrier") >= 6 and kinds.count("cp.async wait") >= 3, found
    shape, math = SHAPES["mini_44x40_D21"], "bf16"
    B, C, H, W, D, k, stride, pool = shape
    x, w, b = inputs(B, C, H, W, D, k, math)
    conv = F.conv2d(x, w, b, stride, k // 2)
    grad = torch.randn(F.max_pool2d(conv, pool, pool).flatten(2).transpose(1, 2).shape).double()
    ref = torch_reference(x, w, b, grad, stride, pool, torch.float64)
    survivors = []
    for site, kind in found:
        env = dict(os.environ, EIT_EMU_SKIP=site)
        rc, log, got = run(emulator, tmp_path, math, (stride, pool), x, w, b, grad, env=env)
        if rc == 0 and not any(torch.isnan(got[key]).any() for key in ("out", "dw", "dx")):
            ours = routed_gradients(x, w, b, grad, got["argmax"], stride, pool, torch.float64)
            if rel(got["out"], ref["out"]) < 1e-3 and rel(got["dw"], ours["dw"]) < 2e-3 \
                    and rel(got["dx"], ours["dx"]) < 2e-3 and (got["argmax"] == ref["argmax"]).float().mean() > 0.98:
                survivors.append(f"{kind} at {site}")
    assert not survivors, f"removing these changes no test result: {survivors}"
