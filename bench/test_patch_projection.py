"""Speed of the fused EIT stem (eit_fast::patch_projection) against eager F.conv2d + F.max_pool2d (cuDNN on
a GPU, oneDNN on the CPU), the same with channels_last input (cuDNN's preferred layout; GPU), and
torch.compile of the eager code, forward and forward+backward (weight and bias gradients, as in training).

Shapes: eit_cifar (32 px, 3x3 / stride 1 / pool 4) and eit_mini at batch 8 on the CPU and the GPU; eit_mini
and eit_tiny (224 px, 16x16 / stride 4 / pool 3, D = 250 / 330) at batch 256 on the GPU only, in bf16 and
fp32 (TF32 tensor cores under PyTorch's default conv precision).

Every case is timed with eit_fast.timing.side_by_side (the paths interleaved in one process, CUDA events on a
GPU, medians); on a GPU each table shows, beside the measured medians, the modelled H100 time of the fused
kernels and of eager conv + pool: eit_fast.perf_model (bytes each kernel reads and writes once against
3.35 TB/s, tensor-core FLOPs against 990 / 495 TFLOP/s dense bf16 / tf32; eager's bytes counted op by op
on meta tensors, its FLOPs the convolutions'). Modelled figures are floors of the schedule, never measured.
`python -m pytest bench/test_patch_projection.py -k modelled -s` prints the modelled table without a GPU.

CPU targets (issue 18), test_cpu_targets, on a quiet machine:
  eit_cifar batch 256 forward at least 3x faster than eager; eit_mini batch 8 forward at least 1.25x on an
  AVX2 machine (simulated on an AVX-512 one: EIT_FAST_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2) and no slower
  with AVX-512.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from eit_fast import machine
from eit_fast.ops import patch_projection as op
from eit_fast.perf_model import H100, Work, count_traffic, modelled_time
from eit_fast.timing import side_by_side

CUDA = torch.cuda.is_available()
# name: (batch, image size, kernel, stride, pool, D, where)
SHAPES = {
    "eit_cifar_b256": (256, 32, 3, 1, 4, 250, ("cpu", "cuda")),
    "eit_mini_b8": (8, 224, 16, 4, 3, 250, ("cpu", "cuda")),
    "eit_mini_b256": (256, 224, 16, 4, 3, 250, ("cuda",)),
    "eit_tiny_b256": (256, 224, 16, 4, 3, 330, ("cuda",)),
}
DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16, torch.float32]}
CASES = [(shape, device, dtype) for shape, spec in SHAPES.items() for device in spec[6]
         for dtype in DTYPES[device] if device == "cpu" or CUDA]
_results = {}

pytestmark = pytest.mark.skipif(not op.loaded(), reason=f"eit_fast._C not built: {op.load_error()}")


def eager(x, w, b, s, p):
    return F.max_pool2d(F.conv2d(x, w, b, s, w.shape[-1] // 2), p, p).flatten(2).transpose(1, 2)


def fused(x, w, b, s, p):
    return op.patch_projection(x, w, b, s, w.shape[-1] // 2, p)


_compiled = {}


def compiled(x, w, b, s, p):
    key = (s, p, x.device.type, x.dtype)
    if key not in _compiled:
        _compiled[key] = torch.compile(eager, dynamic=False)
    return _compiled[key](x, w, b, s, p)


def inputs(shape, device, dtype, grad):
    B, size, k, s, p, D, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, size, size, generator=g).to(device, dtype)
    w = (torch.randn(D, 3, k, k, generator=g) * (2 / (D * k * k)) ** 0.5).to(device, dtype).requires_grad_(grad)
    b = torch.zeros(D, device=device, dtype=dtype, requires_grad=grad)
    return x, w, b, s, p


def modelled(shape, dtype, mode):
    """{path: (seconds, bound)} modelled on the H100 datasheet for the fused kernels and eager conv + pool."""
    B, size, k, s, p, D, _ = SHAPES[shape]
    parts = ("forward", "weight_grad") if mode == "fwd_bwd" else ("forward",)
    works = op.kernel_work((B, 3, size, size), D, k, s, p, dtype, parts)
    fused_s = sum(modelled_time(w, H100).seconds for w in works.values())
    # eager: every aten op's bytes, counted on meta tensors; the convolutions' FLOPs
    x, w, b, _, _ = inputs(shape, "meta", dtype, mode == "fwd_bwd")

    def run():
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            out = eager(x, w, b, s, p)
            if mode == "fwd_bwd":
                out.backward(torch.ones_like(out))

    _, by_op = count_traffic(run)
    conv_flops = 2 * B * ((size + 2 * (k // 2) - k) // s + 1) ** 2 * 3 * k * k * D
    precision = "bf16" if dtype == torch.bfloat16 else "tf32"
    eager_s = 0.0
    for name, nbytes in by_op.items():
        flops = conv_flops if name in ("aten.convolution.default", "aten.convolution_backward.default") else 0
        eager_s += modelled_time(Work(bytes=nbytes, mma_flops=flops, precision=precision), H100).seconds
    return {"fused": fused_s, "eager": eager_s, "works": works}


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{str(c[2]).split('.')[1]}")
def test_patch_projection(benchmark, case, mode):
    shape, device, dtype = case
    x, w, b, s, p = inputs(shape, device, dtype, mode == "fwd_bwd")
    paths = {"fused": fused, "eager": eager, "compiled": compiled}
    if device == "cuda":
        paths["eager_channels_last"] = eager
    x_cl = x.to(memory_format=torch.channels_last)

    def call(name):
        fn, xi = paths[name], x_cl if name == "eager_channels_last" else x

        def run():
            if mode == "fwd":
                with torch.no_grad():
                    return fn(xi, w, b, s, p)
            out = fn(xi, w, b, s, p)
            out.backward(torch.ones_like(out))
            return out
        return run

    fns = {name: call(name) for name in paths}
    big = shape.endswith("b256") and device == "cpu"
    timings = side_by_side(fns, device, warmup=2, iters=25 if device == "cuda" else (9 if big else 11))
    key = (shape, device, str(dtype), mode)
    _results[key] = {name: t.median_s for name, t in timings.items()}
    model = modelled(shape, dtype, mode) if device == "cuda" else None
    isa = torch.ops.eit_fast.patch_projection_cpu_isa() if device == "cpu" else op.cuda_math(dtype)
    where = machine.device_name(device) if device == "cuda" else machine.cpu_summary()
    lines = [f"\n{shape} {mode} {dtype} on {where} (fused: {isa}; "
             f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}; {timings['fused'].method})"]
    for name, t in timings.items():
        ratio = t.median_s / timings["fused"].median_s
        row = f"  {name:20} {t.median_s * 1e3:9.3f} ms median (IQR {t.iqr_s * 1e3:.3f})  fused is {ratio:5.2f}x faster"
        if model is not None and name in ("fused", "eager"):
            row += f"   modelled H100: {model[name] * 1e3:.3f} ms"
        lines.append(row)
    print("\n".join(lines))
    benchmark.extra_info.update(shape=shape, device=device, dtype=str(dtype), mode=mode, isa=isa, where=where,
                                medians_ms={n: t.median_s * 1e3 for n, t in timings.items()},
                                modelled_h100_ms=None if model is None else
                                {n: model[n] * 1e3 for n in ("fused", "eager")})
    benchmark.pedantic(fns["fused"], rounds=3, iterations=1, warmup_rounds=0)


def test_cpu_targets():
    need = [(sh, "cpu", str(torch.float32), "fwd") for sh in ("eit_cifar_b256", "eit_mini_b8")]
    if not all(k in _results for k in need):
        pytest.skip("run the whole file: the targets come from the benchmarks above")
    cifar = _results[need[0]]["eager"] / _results[need[0]]["fused"]
    mini = _results[need[1]]["eager"] / _results[need[1]]["fused"]
    print(f"\nCPU ({machine.cpu_summary()}, fused {torch.ops.eit_fast.patch_projection_cpu_isa()}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}): eit_cifar b256 forward {cifar:.2f}x, "
          f"eit_mini b8 forward {mini:.2f}x faster than eager (medians of interleaved runs)")
    assert cifar >= 3.0, f"eit_cifar batch 256 forward: fused only {cifar:.2f}x faster than eager"
    avx2 = torch.ops.eit_fast.patch_projection_cpu_isa() == "avx2"
    assert mini >= (1.25 if avx2 else 1.0), f"eit_mini batch 8 forward: fused {mini:.2f}x of eager's speed"


@pytest.mark.skipif(not hasattr(torch.ops.eit_fast, "patch_projection_cuda_plan"),
                    reason="the kernel model needs the CUDA build of eit_fast._C")
def test_modelled_times():
    """The modelled H100 times of every GPU case (no GPU needed): per fused kernel, and fused vs eager."""
    lines = ["\nmodelled on the H100 datasheet (not measured): fused kernels vs eager conv + max-pool (cuDNN)"]
    for shape, spec in SHAPES.items():
        for dtype in DTYPES["cuda"]:
            for mode in ("fwd", "fwd_bwd"):
                m = modelled(shape, dtype, mode)
                kernels = ", ".join(f"{n} {modelled_time(w, H100).seconds * 1e3:.3f}" for n, w in m["works"].items())
                lines.append(f"  {shape:15} {str(dtype):15} {mode:8} fused {m['fused'] * 1e3:7.3f} ms  eager "
                             f"{m['eager'] * 1e3:7.3f} ms  ({m['eager'] / m['fused']:.2f}x)  [{kernels}]")
                assert m["fused"] > 0 and m["eager"] > 0
    print("\n".join(lines))
