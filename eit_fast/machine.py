"""What machine this is, for every report and cache key that depends on it: the CPU model and its vector ISA,
the thread count, the GPUs, and the software versions. One description, used by `auto`'s cache, the
benchmarks and the GPU check alike."""
from __future__ import annotations

import functools
import os
import platform

import torch

# ISA flags that change which CPU kernels run (and how fast oneDNN's are), best first.
_ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512_fp16", "avx512f", "avx2", "fma")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; platform's guess where there is none."""
    model, flags = "", ()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = tuple(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_isa() -> list[str]:
    """The vector-ISA flags of _ISA_FLAGS this CPU has, e.g. ['avx512_bf16', 'avx512f', 'avx2', 'fma']."""
    have = set(_cpuinfo()[1])
    return [f for f in _ISA_FLAGS if f in have]


def cpu_summary() -> str:
    """'Intel(R) Xeon(R) Processor, AVX-512 (avx512_bf16, ...), 2 threads': the line every CPU figure carries."""
    isa = cpu_isa()
    level = "AMX" if "amx_bf16" in isa else "AVX-512" if "avx512f" in isa else "AVX2" if "avx2" in isa else \
        "no AVX2"
    return f"{cpu_model()}, {level} ({' '.join(isa) or 'none of ' + ' '.join(_ISA_FLAGS)}), " \
           f"{torch.get_num_threads()} threads"


def gpu_names() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def device_name(device: torch.device | str) -> str:
    """'NVIDIA H200' for a CUDA device, the CPU summary for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_summary()


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from . import __version__
    return {"eit_fast": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version}


def describe() -> dict:
    """Everything above, as one JSON-able dict."""
    return {"cpu": cpu_model(), "cpu_isa": cpu_isa(), "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "gpus": gpu_names(), **versions()}
