"""Builds eit_fast, its Triton kernels (kernels/ -> eit_fast.kernels) and, when csrc/ has sources, the
extension eit_fast._C.

The extension is CUDA + CPU when this torch is a CUDA build and a CUDA toolkit is found, CPU only otherwise.
That is decided from the build environment, never from torch.cuda.is_available(): build hosts have no GPU.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_TORCH = """
eit_fast's extension (csrc/) must be compiled against the torch that will run it, and this build
environment has no torch: pip's build isolation hides it (and would fetch another one).
Install torch first, then build without isolation:

    pip install torch
    pip install --no-build-isolation .
"""


def packages():
    pkgs = find_packages(ROOT, include=["eit_fast", "eit_fast.*"])
    package_dir = {}
    if glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        pkgs.append("eit_fast.kernels")
        package_dir["eit_fast.kernels"] = "kernels"
    return pkgs, package_dir


def extension_sources():
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True, root_dir=ROOT))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True, root_dir=ROOT))
    return cpp, cu


def extensions():
    cpp, cu = extension_sources()
    if not cpp and not cu:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit(NO_TORCH)
    with_cuda = bool(cu) and torch.version.cuda is not None and CUDA_HOME is not None \
        and os.environ.get("EIT_FAST_CPU_ONLY", "0") != "1"
    flags = {"cxx": ["-O3", "-std=c++17"]}
    if with_cuda:
        flags["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension("eit_fast._C", cpp + cu, extra_compile_args=flags,
                            define_macros=[("EIT_FAST_WITH_CUDA", "1")], py_limited_api=False)
    else:
        ext = CppExtension("eit_fast._C", cpp, extra_compile_args=flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    pkgs, package_dir = packages()
    ext_modules, cmdclass = extensions()
    setup(packages=pkgs, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
