"""`python -m eit_fast.bench` and `python -m eit_fast.gpu_check` run on this GPU-less machine: every path
reported (measured, or skipped with its reason), the report files written, the modelled floor labelled.
Only the structure is checked here: timing never goes in tests."""
import csv
import subprocess
import sys

import pytest
import torch

from eit_fast.bench.whole_model import Case, modelled_floor
from eit_fast.perf_model import H100


def run(*args, timeout=900):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    return r


EAGER = ("reference", "sdpa_pad8", "fused", "auto")
ALL = EAGER + ("compile", "fused_compile")


@pytest.mark.parametrize("paths", [EAGER, pytest.param(ALL, marks=pytest.mark.slow)], ids=["eager", "all"])
def test_bench_reports_every_path_with_the_modelled_floor(tmp_path, paths):
    r = run("-m", "eit_fast.bench", "--models", "eit_cifar", "--batch", "2", "--iters", "1", "--dtypes", "fp32",
            "--paths", *paths, "--output", str(tmp_path), "--no-plot")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(ln for ln in (tmp_path / "bench.csv").read_text().splitlines()
                               if not ln.startswith("#")))
    assert {(x["mode"], x["path"]) for x in rows} == {(m, p) for m in ("infer", "train") for p in paths}
    for x in rows:
        assert x["status"] in ("measured", "skipped") and float(x["floor_ms"]) > 0
        if x["status"] == "skipped":
            assert x["note"]
        else:
            assert float(x["median_ms"]) > 0 and float(x["images_per_s"]) > 0
    md = (tmp_path / "bench.md").read_text()
    assert "H100 floor ms (modelled)" in md and "device: CPU" in md and "torch " + torch.__version__ in md
    if not torch.cuda.is_available():
        fused = [x for x in rows if x["path"] == "fused"]
        assert all("block_mixer: no CUDA GPU" in x["note"] for x in fused)  # the CUDA-only part, with why


def test_bench_refuses_a_missing_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    r = run("-m", "eit_fast.bench", "--device", "cuda", "--output", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip() == "error: --device cuda: no CUDA GPU is visible"


def test_the_floor_is_flops_or_bytes_over_the_h100_limits():
    infer = modelled_floor(Case("eit_mini", 64, "infer", "bf16"))
    train = modelled_floor(Case("eit_mini", 64, "train", "bf16"))
    assert infer.device.startswith("H100") and "datasheet" in infer.device
    assert train.seconds > 2 * infer.seconds
    from eit_fast import count_macs, get_config
    macs = count_macs(get_config("eit_mini"), batch=64).total
    assert infer.terms["mma"] == pytest.approx(2 * macs / H100.mma_per_s["bf16"], rel=1e-6)
    fp32 = modelled_floor(Case("eit_mini", 64, "infer", "fp32"))
    assert fp32.terms["fma"] == pytest.approx(2 * macs / H100.fma_per_s, rel=1e-6) and fp32.bound == "fma"


def test_gpu_check_without_a_gpu_says_what_it_skipped(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the real check runs (python -m eit_fast.gpu_check)")
    r = run("-m", "eit_fast.gpu_check", "--budget-s", "60", "--phases", "build", "tests", "racecheck",
            "--output", str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "device: no GPU" in md
    for phase in ("build", "tests", "racecheck"):
        assert f"| {phase} | skipped |" in md
    assert "every cuda-marked test skips" in md and (tmp_path / "cuda-tests.log").is_file()
