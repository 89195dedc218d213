"""setup.py: kernels/ ships as eit_fast.kernels, and an isolated build never compiles against another torch."""
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
    (project_copy / "kernels" / "probe_kernel.py").write_text("PROBE = 1\n")
    r = pip("wheel", "--no-build-isolation", "--no-deps", ".", "-w", "dist", cwd=project_copy)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (project_copy / "dist").glob("eit_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "eit_fast/kernels/probe_kernel.py" in names
    assert "eit_fast/configs.py" in names
