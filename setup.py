"""Builds eit_fast, its Triton kernels (kernels/ -> eit_fast.kernels) and, when csrc/ has sources, the
extension eit_fast._C.

The extension is CUDA + CPU when this torch is a CUDA build and a CUDA toolkit is found, CPU only otherwise.
That is decided from the build environment, never from torch.cuda.is_available(): build hosts have no GPU.

Environment: CUDA_HOME (else the toolkit is searched for: nvcc on PATH, /usr/local/cuda, /usr/local/cuda-*),
EIT_FAST_CPU_ONLY=1 (skip the CUDA kernels), TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), MAX_JOBS
(parallel compile jobs, read by torch's ninja build).
"""
import glob
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join(ROOT, "build", "eit_fast_generated")
DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100 and H100 class, plus PTX for newer GPUs
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
    """(C++ sources for every build, C++/CUDA sources only for a CUDA build); csrc/cuda/ holds the latter."""
    def find(pattern):
        return sorted(glob.glob(os.path.join("csrc", "**", pattern), recursive=True, root_dir=ROOT))
    cuda_dir = os.path.join("csrc", "cuda") + os.sep
    cpp = [f for f in find("*.cpp") if not f.startswith(cuda_dir)]
    cuda = [f for f in find("*.cpp") + find("*.cu") if f.startswith(cuda_dir)]
    return cpp, cuda


def is_toolkit(path):
    lib = ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"), os.path.join("targets", "sbsa-linux", "lib"))
    return (os.path.isfile(os.path.join(path, "bin", "nvcc"))
            and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
            and any(glob.glob(os.path.join(path, d, "libcudart.so*")) for d in lib))


def find_cuda_home(env=os.environ, search=("/usr/local/cuda", "/usr/local/cuda-*")):
    """(toolkit folder or None, how it was found or why none was).

    torch's own guess with CUDA_HOME unset takes the folder two levels above the first nvcc on PATH, which is
    wrong when that nvcc is a wrapper script (as in /usr/local/bin/nvcc -> /usr/local); so look ourselves.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            path = env[var]
            if is_toolkit(path):
                return path, f"${var}={path}"
            return None, f"${var}={path} is not a CUDA toolkit (needs bin/nvcc, include/cuda_runtime.h, libcudart)"
    candidates = []
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for pattern in search:
        candidates += sorted(glob.glob(pattern), reverse=True)
    for path in candidates:
        if is_toolkit(path):
            return path, f"found at {path}"
    return None, "no CUDA toolkit found (set CUDA_HOME to one: bin/nvcc, include/cuda_runtime.h, libcudart)"


def write_build_info(with_cuda, note):
    """A header that eit_fast._C exposes as with_cuda / build_note, so eit_fast.info() can say why."""
    os.makedirs(GENERATED, exist_ok=True)
    text = (f"#define EIT_FAST_BUILT_WITH_CUDA {int(with_cuda)}\n"
            f"#define EIT_FAST_BUILD_NOTE {json.dumps(note)}\n")  # a JSON string is a valid C literal here
    path = os.path.join(GENERATED, "eit_fast_build_info.h")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def extensions():
    cpp, cuda = extension_sources()
    if not cpp:
        return [], {}
    try:
        import torch
    except ImportError:
        sys.exit(NO_TORCH)
    cuda_home, found = find_cuda_home()
    if os.environ.get("EIT_FAST_CPU_ONLY", "0") == "1":
        with_cuda, note = False, "CPU kernels only: EIT_FAST_CPU_ONLY=1 at build time"
    elif torch.version.cuda is None:
        with_cuda, note = False, f"CPU kernels only: torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        with_cuda, note = False, f"CPU kernels only: {found}"
    else:
        with_cuda, note = True, f"CPU and CUDA kernels (CUDA toolkit {found})"
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when imported below
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        note += f", archs {os.environ['TORCH_CUDA_ARCH_LIST']}"
    print(f"eit_fast._C: building {note}", file=sys.stderr)
    write_build_info(with_cuda, note)
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home  # in case it was imported (and guessed) before we set CUDA_HOME
    # -fopenmp: at::parallel_for is a header template that runs serially unless the extension itself is built
    # with OpenMP (torch's CPU build uses it); the link resolves to the libgomp torch has already loaded.
    flags = {"cxx": ["-O3", "-fopenmp"]}  # torch sets the C++ standard it needs (C++20 for torch 2.14)
    link = ["-fopenmp"]
    include_dirs = [GENERATED]
    if with_cuda:
        flags["nvcc"] = ["-O3", "-lineinfo"]
        ext = CUDAExtension("eit_fast._C", cpp + cuda, extra_compile_args=flags, extra_link_args=link,
                            include_dirs=include_dirs, py_limited_api=False)
    else:
        ext = CppExtension("eit_fast._C", cpp, extra_compile_args=flags, extra_link_args=link,
                           include_dirs=include_dirs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    pkgs, package_dir = packages()
    ext_modules, cmdclass = extensions()
    setup(packages=pkgs, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
