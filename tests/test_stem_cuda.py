"""The patch projection's CUDA kernels on a real GPU (skipped without one): every parity case of the CPU and
emulated tests in every math mode (tf32 and exact fp32 for float32 inputs, bf16, fp16), the TF32 rule,
bitwise reproducible weight gradients, the input gradient's refusal under deterministic algorithms,
channels_last input read without a copy, and compute-sanitizer's racecheck."""
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from test_patch_projection import CASES, copies_of, rel
from test_patch_projection_emulated import SHAPES, routed_gradients, torch_reference

pytestmark = pytest.mark.cuda

MODES = {"tf32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (B, C, H, W, D, k, stride, pool): the CPU cases (3 channels) and the emulated ones, and the bench shapes
ALL_CASES = {f"cpu_B{B}_{H}x{W}_D{D}_k{k}s{s}p{p}": (B, 3, H, W, D, k, s, p) for B, H, W, D, k, s, p in CASES}
ALL_CASES.update({f"emu_{name}": shape for name, shape in SHAPES.items()})
ALL_CASES.update({"mini_224_B4_D250": (4, 3, 224, 224, 250, 16, 4, 3), "tiny_224_B2_D330": (2, 3, 224, 224, 330, 16, 4, 3),
                  "base_224_B1_D400": (1, 3, 224, 224, 400, 16, 4, 3), "large_224_B1_D464": (1, 3, 224, 224, 464, 16, 4, 3),
                  "cifar_32_B64_D250": (64, 3, 32, 32, 250, 3, 1, 4)})


@contextmanager
def conv_precision(mode):
    """float32 convolutions in tf32 or exactly (the setting the fused op follows, as cuDNN does)."""
    old = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee" if mode == "fp32" else "tf32"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = old


def fused_all(x, w, b, grad, stride, pool):
    """out, argmax, dx, dw of the fused op (the three kernels), on x's device."""
    pad = w.shape[-1] // 2
    out, argmax = torch.ops.eit_fast.patch_projection(x, w, b, stride, pad, pool)
    dw, db = torch.ops.eit_fast.patch_projection_backward_weight(grad, argmax, x, w, stride, pad, pool)
    dx = torch.ops.eit_fast.patch_projection_backward_input(grad, argmax, x, w, stride, pad, pool)
    return out, argmax, dx, dw, db


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(ALL_CASES))
def test_cuda_matches_the_reference(name, mode):
    B, C, H, W, D, k, stride, pool = ALL_CASES[name]
    dtype = MODES[mode]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g).to(dtype).double()
    w = (torch.randn(D, C, k, k, generator=g) * (2 / (C * k * k)) ** 0.5).to(dtype).double()
    b = torch.randn(D, generator=g).to(dtype).double()
    ref = F.max_pool2d(F.conv2d(x, w, b, stride, k // 2), pool, pool).flatten(2).transpose(1, 2)
    grad = torch.randn(ref.shape, generator=g).to(dtype).double()
    with conv_precision(mode):
        out, argmax, dx, dw, db = fused_all(*(t.to("cuda", dtype) for t in (x, w, b, grad)), stride, pool)
        torch.cuda.synchronize()
        assert out.dtype == dtype and not torch.isnan(out).any()
        ours = routed_gradients(x, w, b, grad, argmax.cpu().long(), stride, pool, torch.float64)
        errs = {"out": rel(out.cpu(), ref), "dx": rel(dx.cpu(), ours["dx"]), "dw": rel(dw.cpu(), ours["dw"]),
                "db": rel(db.cpu(), grad.sum((0, 1)))}
        if mode == "fp32":
            tol = dict.fromkeys(errs, 1e-5)
        elif mode == "tf32":  # 10-bit mantissa: a tolerance of its own
            tol = {"out": 1e-3, "dx": 2e-3, "dw": 2e-3, "db": 1e-5}
        else:  # no worse than twice cuDNN's own error in that precision, plus a small floor
            r = torch_reference(*(t.to("cuda") for t in (x, w, b, grad)), stride, pool, dtype)  # cuDNN's error
            theirs = routed_gradients(x, w, b, grad, r["argmax"].cpu(), stride, pool, torch.float64)
            tol = {"out": 2 * rel(r["out"].cpu(), ref) + 1e-3, "dx": 2 * rel(r["dx"].cpu(), theirs["dx"]) + 1e-3,
                   "dw": 2 * rel(r["dw"].cpu(), theirs["dw"]) + 1e-3, "db": 1e-2}
    assert all(errs[key] < tol[key] for key in errs), (errs, tol)
    agree = (argmax.cpu().long() == ref_argmax(x, w, b, stride, pool)).double().mean().item()
    assert agree > (0.999 if mode == "fp32" else 0.98), agree


def ref_argmax(x, w, b, stride, pool):
    conv = F.conv2d(x, w, b, stride, w.shape[-1] // 2)
    _, idx = F.max_pool2d(conv, pool, pool, return_indices=True)
    Wc = conv.shape[3]
    return ((idx // Wc % pool) * pool + idx % Wc % pool).flatten(2).transpose(1, 2)


def test_float32_follows_the_conv_precision_setting():
    x = torch.randn(2, 3, 64, 64, device="cuda")
    w, b = torch.randn(64, 3, 16, 16, device="cuda") * 0.05, torch.randn(64, device="cuda")
    ref = F.max_pool2d(F.conv2d(x.double(), w.double(), b.double(), 4, 8), 3, 3).flatten(2).transpose(1, 2)
    with conv_precision("fp32"):
        assert torch.ops.eit_fast.patch_projection_cuda_math(torch.float32) == "fp32"
        exact = torch.ops.eit_fast.patch_projection(x, w, b, 4, 8, 3)[0]
    with conv_precision("tf32"):
        assert torch.ops.eit_fast.patch_projection_cuda_math(torch.float32) == "tf32"
        tf32 = torch.ops.eit_fast.patch_projection(x, w, b, 4, 8, 3)[0]
    assert rel(exact.cpu(), ref.cpu()) < 1e-6
    assert 1e-6 < rel(tf32.cpu(), ref.cpu()) < 1e-3  # tensor cores really ran, in tf32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_gradient_is_bitwise_reproducible(dtype):
    x = torch.randn(16, 3, 224, 224, device="cuda", dtype=dtype)
    w, b = (torch.randn(250, 3, 16, 16, device="cuda") * 0.02).to(dtype), torch.randn(250, device="cuda", dtype=dtype)
    out, argmax = torch.ops.eit_fast.patch_projection(x, w, b, 4, 8, 3)
    grad = torch.randn_like(out)
    first = torch.ops.eit_fast.patch_projection_backward_weight(grad, argmax, x, w, 4, 8, 3)
    for _ in range(3):
        again = torch.ops.eit_fast.patch_projection_backward_weight(grad, argmax, x, w, 4, 8, 3)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_input_gradient_refuses_deterministic_algorithms():
    x = torch.randn(2, 3, 32, 32, device="cuda", requires_grad=True)
    w = torch.randn(8, 3, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(8, device="cuda", requires_grad=True)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        out = torch.ops.eit_fast.patch_projection(x.detach(), w, b, 1, 1, 4)[0]
        out.sum().backward()  # weights only: deterministic, allowed
        assert w.grad is not None
        with pytest.raises(RuntimeError, match="patch_projection_backward_input"):
            torch.ops.eit_fast.patch_projection(x, w, b, 1, 1, 4)[0].sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)


def test_cuda_reads_channels_last_input_as_it_is():
    x = torch.randn(4, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    w, b = torch.randn(250, 3, 16, 16, device="cuda") * 0.02, torch.randn(250, device="cuda")
    assert copies_of(lambda: torch.ops.eit_fast.patch_projection(x, w, b, 4, 8, 3), x.shape) == []
    with conv_precision("fp32"):
        out = torch.ops.eit_fast.patch_projection(x, w, b, 4, 8, 3)[0]
        ref = torch.ops.eit_fast.patch_projection(x.contiguous(), w, b, 4, 8, 3)[0]
    assert rel(out.cpu(), ref.cpu()) < 1e-6


def test_opcheck_on_cuda():
    for dtype in (torch.float32, torch.bfloat16):
        args = (torch.randn(2, 3, 40, 36, device="cuda", dtype=dtype, requires_grad=True),
                torch.randn(12, 3, 16, 16, device="cuda", dtype=dtype, requires_grad=True),
                torch.randn(12, device="cuda", dtype=dtype, requires_grad=True), 4, 8, 3)
        torch.library.opcheck(torch.ops.eit_fast.patch_projection.default, args)


def compute_sanitizer():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for path in (shutil.which("compute-sanitizer"), os.path.join(cuda_home, "bin", "compute-sanitizer"),
                 os.path.join(cuda_home, "compute-sanitizer", "compute-sanitizer")):
        if path and os.path.exists(path):
            return path
    return None


RACECHECK_SCRIPT = """
import torch, eit_fast
from eit_fast.ops import patch_projection as op
for dtype in (torch.bfloat16, torch.float32):
    x = torch.randn(2, 3, 64, 60, device="cuda", dtype=dtype)
    w = (torch.randn(130, 3, 16, 16, device="cuda") * 0.05).to(dtype)
    b = torch.randn(130, device="cuda", dtype=dtype)
    out, argmax = torch.ops.eit_fast.patch_projection(x, w, b, 4, 8, 3)
    g = torch.randn_like(out)
    torch.ops.eit_fast.patch_projection_backward_weight(g, argmax, x, w, 4, 8, 3)
    torch.ops.eit_fast.patch_projection_backward_input(g, argmax, x, w, 4, 8, 3)
    torch.cuda.synchronize()
print("stem ran")
"""


@pytest.mark.parametrize("tool", ["racecheck", "synccheck"])
def test_compute_sanitizer_finds_no_hazard(tool):
    sanitizer = compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not installed (CUDA toolkit's compute-sanitizer)")
    r = subprocess.run([sanitizer, f"--tool={tool}", sys.executable, "-c", RACECHECK_SCRIPT], capture_output=True,
                       text=True, timeout=1800)
    log = r.stdout + r.stderr
    if "stem ran" not in log and ("not supported" in log.lower() or "unable to" in log.lower()):
        pytest.skip(f"compute-sanitizer refuses this device: {log[-400:]}")
    assert r.returncode == 0 and "stem ran" in log, log[-3000:]
    assert "0 hazards" in log or "ERROR SUMMARY: 0 errors" in log, log[-3000:]
