"""The real CUDA kernels of the patch projection (csrc/cuda/patch_projection_kernels.cuh), compiled by g++
against csrc/cuda/emulation.h and run on the CPU, against F.conv2d + F.max_pool2d: output, argmax, dW, dx."""
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

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    exe = tmp_path_factory.mktemp("emu") / "emulated_kernels"
    r = subprocess.run([CXX, "-std=c++20", "-O2", "-pthread", "-Wall", "-Werror", "-o", str(exe), str(SOURCE)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return exe


def test_self_check_against_direct_loops(emulator):
    r = subprocess.run([str(emulator)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 3 and "FAIL" not in r.stdout


# (B, H, W, D, k, stride, pool): both stems, non-square, D across the 64-channel tile edge, tokens across
# the 32-row tile edge, reduction lengths off the 16 chunk.
CASES = [(2, 32, 32, 70, 3, 1, 4), (1, 45, 38, 33, 16, 4, 3), (3, 13, 11, 65, 3, 1, 4), (2, 10, 9, 5, 1, 1, 2)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_{}x{}_D{}_k{}s{}p{}".format(*c))
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_emulated_cuda_kernels_match_pytorch(emulator, tmp_path, case, dtype):
    tdt = torch.float32 if dtype == "f32" else torch.float64
    B, H, W, D, k, s, p = case
    check(emulator, tmp_path, case, dtype, torch.randn(B, 3, H, W, dtype=tdt), torch.randn(D, 3, k, k, dtype=tdt),
          torch.randn(D, dtype=tdt))


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_emulated_ties_go_to_the_first_maximum(emulator, tmp_path, dtype):
    # Small integers make every conv value exact: equal windows tie exactly, as in PyTorch's own run.
    tdt = torch.float32 if dtype == "f32" else torch.float64
    x = torch.randint(0, 2, (2, 3, 1, 1)).to(tdt).expand(2, 3, 21, 19).contiguous()
    x[:, :, ::5] = 0
    w, b = torch.randint(-2, 3, (70, 3, 3, 3)).to(tdt), torch.randint(-2, 3, (70,)).to(tdt)
    check(emulator, tmp_path, (2, 21, 19, 70, 3, 1, 4), dtype, x, w, b)


def test_emulated_nan_propagates(emulator, tmp_path):
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    x[0, 1, 5, 7] = x[1, 0, 20, 3] = float("nan")
    check(emulator, tmp_path, (2, 24, 24, 5, 3, 1, 4), "f64", x, torch.randn(5, 3, 3, 3, dtype=torch.float64),
          torch.randn(5, dtype=torch.float64), nan=True)


def check(emulator, tmp_path, case, dtype, x, w, b, nan=False):
    B, H, W, D, k, s, p = case
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    conv = F.conv2d(x, w, b, s, k // 2)
    pooled, idx = F.max_pool2d(conv, p, p, return_indices=True)
    ref = pooled.flatten(2).transpose(1, 2)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    for name, t in (("x", x), ("w", w), ("b", b), ("grad", grad)):
        t.detach().contiguous().numpy().tofile(tmp_path / f"{name}.bin")
    args = [dtype, B, 3, H, W, D, k, s, k // 2, p, tmp_path, tmp_path]
    r = subprocess.run([str(emulator), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    npdt = np.float32 if dtype == "f32" else np.float64
    out = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=npdt)).view(ref.shape)
    argmax = torch.from_numpy(np.fromfile(tmp_path / "argmax.bin", dtype=np.uint8)).view(ref.shape).long()
    dw = torch.from_numpy(np.fromfile(tmp_path / "dw.bin", dtype=npdt)).view(w.shape)
    dx = torch.from_numpy(np.fromfile(tmp_path / "dx.bin", dtype=npdt)).view(x.shape)
    # PyTorch's flat conv-map index -> row-major window offset
    Wc = conv.shape[3]
    iy, ix = idx // Wc, idx % Wc
    want_argmax = ((iy % p) * p + ix % p).flatten(2).transpose(1, 2)
    tol = 1e-5 if dtype == "f32" else 1e-12

    def rel(a, r):
        return ((a.double() - r.double()).norm() / r.double().norm()).item()

    assert torch.equal(argmax, want_argmax)
    if nan:
        assert torch.isnan(ref).any()
        for got, want in ((out, ref.detach()), (dw, w.grad), (dx, x.grad)):
            torch.testing.assert_close(got, want, equal_nan=True, rtol=tol, atol=tol)
        return
    assert not torch.isnan(out).any()  # the output buffer is poisoned with NaN: every element was written
    assert rel(out, ref.detach()) < tol
    assert rel(dw, w.grad) < tol and rel(dx, x.grad) < tol
