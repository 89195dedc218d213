"""nvcc compiles the patch projection's CUDA kernels for sm_80 and sm_90 with no register spills (ptxas -v).
Skips only when no CUDA toolkit (nvcc) is found, searched for the same way setup.py does."""
import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU = ROOT / "csrc" / "cuda" / "patch_projection.cu"


def toolkit():
    spec = importlib.util.spec_from_file_location("eit_fast_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    return setup.find_cuda_home()[0]


CUDA_HOME = toolkit()


@pytest.mark.skipif(CUDA_HOME is None, reason="no CUDA toolkit (nvcc) found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_without_spills(arch, tmp_path):
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    r = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o",
                        str(tmp_path / "k.cubin"), str(CU)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    log = r.stdout + r.stderr
    entries = re.findall(r"Compiling entry function '(\w+)' for '(\w+)'", log)
    kernels = {name for name, a in entries if a == arch}
    # forward, weight-gradient and input-gradient kernels, each for fp32, fp16 and bf16
    assert len(kernels) == 9, log
    for kind in ("forward_kernel", "weight_grad_kernel", "input_grad_kernel"):
        assert sum(kind in k for k in kernels) == 3, log
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(spills) == 9, log
    assert all(s == ("0", "0") for s in spills), log
    stacks = [int(v) for v in re.findall(r"(\d+) bytes stack frame", log)]
    assert stacks == [0] * 9, log
