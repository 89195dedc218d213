"""setup.py: kernels/ ships as eit_fast.kernels, an isolated build never compiles against another torch, the
CUDA toolkit is found without CUDA_HOME, and a build without one says what it left out."""
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project_copy(tmp_path):
    dst = tmp_path / "project"
    dst.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "eit_fast", dst / "eit_fast", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for folder in ("kernels", "csrc"):
        if (ROOT / folder).exists():
            shutil.copytree(ROOT / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dst / folder).mkdir()
    return dst


def pip(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_plain_pip_install_stops_at_once_with_the_command_to_run(project_copy):
    (project_copy / "csrc" / "probe_op.cpp").write_text("int eit_fast_probe;\n")
    r = pip("wheel", "--no-deps", ".", "-w", "dist", cwd=project_copy)  # build isolation on: no torch inside
    assert r.returncode != 0
    assert "pip install --no-build-isolation ." in r.stdout + r.stderr
    assert not (project_copy / "dist").exists() or not list((project_copy / "dist").glob("*.whl"))


def test_kernels_folder_installs_as_eit_fast_kernels(project_copy):
    shutil.rmtree(project_copy / "csrc")  # the extension's build is tested below; this is about kernels/
    (project_copy / "kernels" / "probe_kernel.py").write_text("PROBE = 1\n")
    r = pip("wheel", "--no-build-isolation", "--no-deps", ".", "-w", "dist", cwd=project_copy)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (project_copy / "dist").glob("eit_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "eit_fast/kernels/probe_kernel.py" in names
    assert "eit_fast/configs.py" in names


def load_setup():
    spec = importlib.util.spec_from_file_location("eit_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_toolkit(path):
    for rel, text in (("bin/nvcc", "#!/bin/sh\n"), ("include/cuda_runtime.h", ""), ("lib64/libcudart.so", "")):
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


def test_toolkit_found_past_an_nvcc_wrapper(tmp_path):
    setup = load_setup()
    wrapper = tmp_path / "local" / "bin" / "nvcc"  # like /usr/local/bin/nvcc: torch would guess tmp/local
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text("#!/bin/sh\nexec /elsewhere/nvcc \"$@\"\n")
    wrapper.chmod(0o755)
    toolkit = make_toolkit(tmp_path / "cuda-13.0")
    env = {"PATH": str(wrapper.parent)}
    assert setup.find_cuda_home(env, search=[str(tmp_path / "cuda-*")]) == (str(toolkit), f"found at {toolkit}")
    assert setup.find_cuda_home(env, search=[]) == (None, setup.find_cuda_home({}, search=[])[1])
    assert "no CUDA toolkit found" in setup.find_cuda_home(env, search=[])[1]
    bad = setup.find_cuda_home({"CUDA_HOME": str(tmp_path / "local")}, search=[])
    assert bad[0] is None and "is not a CUDA toolkit" in bad[1]
    assert setup.find_cuda_home({"CUDA_HOME": str(toolkit)}, search=[])[0] == str(toolkit)


def test_cpu_only_build_says_what_it_left_out(tmp_path, monkeypatch):
    setup = load_setup()
    monkeypatch.setattr(setup, "GENERATED", str(tmp_path))
    monkeypatch.setenv("EIT_FAST_CPU_ONLY", "1")
    (ext,), _ = setup.extensions()
    assert not any("cuda" in src for src in ext.sources)
    header = (tmp_path / "eit_fast_build_info.h").read_text()
    assert "#define EIT_FAST_BUILT_WITH_CUDA 0" in header
    assert '"CPU kernels only: EIT_FAST_CPU_ONLY=1 at build time"' in header


@pytest.mark.skipif(load_setup().find_cuda_home()[0] is None, reason="no CUDA toolkit here")
def test_cuda_build_defaults_to_sm80_and_sm90(tmp_path, monkeypatch):
    import torch
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU build")
    setup = load_setup()
    monkeypatch.setattr(setup, "GENERATED", str(tmp_path))
    for var in ("EIT_FAST_CPU_ONLY", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME"):
        monkeypatch.delenv(var, raising=False)
    (ext,), _ = setup.extensions()
    assert "csrc/cuda/patch_projection.cu" in ext.sources and "csrc/cuda/patch_projection_cuda.cpp" in ext.sources
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
    assert os.environ["CUDA_HOME"] == setup.find_cuda_home()[0]
    assert "#define EIT_FAST_BUILT_WITH_CUDA 1" in (tmp_path / "eit_fast_build_info.h").read_text()


def test_installed_extension_reports_its_build():
    import eit_fast
    from eit_fast.modules import fused_patch
    from eit_fast.ops import patch_projection as op
    assert op.loaded(), op.load_error()
    ok, reason = fused_patch.availability()
    assert ok
    if eit_fast._C.with_cuda:
        assert reason == "eit_fast._C built with CPU+CUDA kernels"
    else:
        assert reason.startswith("eit_fast._C built with the CPU kernel only (CPU kernels only: ")


@pytest.mark.slow
def test_cpu_only_wheel_builds_and_runs(project_copy, tmp_path):
    env = dict(os.environ, EIT_FAST_CPU_ONLY="1", MAX_JOBS="2")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", ".", "-w", "dist"],
                       cwd=project_copy, capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "eit_fast._C: building CPU kernels only: EIT_FAST_CPU_ONLY=1 at build time" in r.stdout + r.stderr
    (wheel,) = (project_copy / "dist").glob("eit_fast-*.whl")
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    # Import the wheel's eit_fast, not a development install's (an editable finder sits on sys.meta_path).
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in str(f)]; "
            f"sys.path.insert(0, {str(target)!r}); "
            "import torch, eit_fast, eit_fast._C as C; from eit_fast.ops import patch_projection as op; "
            "print(eit_fast.__file__); print(C.with_cuda, op.has_kernel('cpu'), op.has_kernel('cuda'), "
            "op.patch_projection(torch.randn(1, 3, 32, 32), torch.randn(4, 3, 3, 3), torch.randn(4), 1, 1, 4).shape)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    where, result = r.stdout.strip().splitlines()
    assert where.startswith(str(target))
    assert result == "False True False torch.Size([1, 64, 4])"
