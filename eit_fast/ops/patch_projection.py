"""eit_fast::patch_projection: Conv2d(k, stride, padding) then MaxPool2d(pool), as one op writing tokens
(B, Hp*Wp, D) (EIT-P, docs/design.md section 1.1).

The kernels live in the extension eit_fast._C (csrc/): a C++ CPU kernel always, CUDA kernels when the build
found a toolkit. This module registers their fake kernels (shapes for torch.compile / export) and the
autograd formula with torch.library, and is the checked entry point.
"""
from __future__ import annotations

import torch

try:
    from .. import _C  # loading the library registers the ops (TORCH_LIBRARY in csrc/)
    _LOAD_ERROR = None
except ImportError as e:  # not built (a plain source checkout), or built against another torch
    _C = None
    _LOAD_ERROR = str(e)

OP = "eit_fast::patch_projection"
# Dtypes each kernel computes (fp64 on CPU is for gradcheck; CUDA accumulates fp16/bf16 in fp32).
DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float64),
          "cuda": (torch.float32, torch.float16, torch.bfloat16)}


def loaded() -> bool:
    return _C is not None


def load_error() -> str | None:
    return _LOAD_ERROR


# Which device types eit_fast._C registered kernels for; fixed once the library is loaded (and a plain dict
# lookup keeps the checks below traceable by torch.compile).
_KERNELS = {dev: _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(OP, dev.upper())
            for dev in DTYPES}


def has_kernel(device_type: str) -> bool:
    """Whether eit_fast._C registered a kernel of the op for this device type ("cpu", "cuda")."""
    return _KERNELS.get(device_type, False)


def build_note() -> str:
    return _C.build_note if _C is not None else f"eit_fast._C is not available: {_LOAD_ERROR}"


def unsupported(x: torch.Tensor) -> str | None:
    """Why the op cannot run on `x` here, or None."""
    if _C is None:
        return f"eit_fast._C is not available ({_LOAD_ERROR})"
    dev = x.device.type
    if dev not in DTYPES:
        return f"no kernel for device type {dev!r}"
    if not has_kernel(dev):
        return f"eit_fast._C has no {dev.upper()} kernel: {build_note()}"
    if x.dtype not in DTYPES[dev]:
        return f"the {dev.upper()} kernel takes {', '.join(str(d) for d in DTYPES[dev])}, not {x.dtype}"
    return None


def cuda_math(dtype: torch.dtype) -> str:
    """The math the CUDA kernels use for `dtype`: "bf16", "fp16", or for float32 "tf32" (tensor cores) when
    PyTorch's convolution precision setting allows TF32 (as the cuDNN convolution it replaces does), else "fp32"
    (exact FMA). The rule is the C++ op's; this only asks it."""
    return torch.ops.eit_fast.patch_projection_cuda_math(dtype)


def kernel_work(x_shape, D: int, k: int, stride: int, pool: int, dtype: torch.dtype,
                parts=("forward",)) -> dict:
    """What the CUDA kernels do for one call, as eit_fast.perf_model.Work per kernel (docs/design.md section 6).

    The model: bytes are each kernel's inputs read once and outputs written once from device memory; the
    re-reads inside a launch (every block gathers its patches and streams its weight tiles; a patch pixel is
    read by up to (k/stride)^2 * windows conv rows) are served by L1/L2 and not counted. Tensor-core FLOPs are
    what the mma instructions execute, 2 per multiply-add, tile padding included: forward 2 * rows * Kpad * Dpad
    (rows = conv rows = tokens * pool^2), weight gradient 2 * rows * Kt * Dpad (a dense GEMM: every window
    position, the routed gradient masked), input gradient 2 * rows * Kt * Dk. The exact fp32 path counts the
    same FLOPs as FMA work. Padded sizes and the weight gradient's slices come from the launchers' own plan
    (op patch_projection_cuda_plan), so the figures follow the kernels. modelled_time then takes the larger of
    bytes / bandwidth and FLOPs / rate: a floor that assumes the tensor cores at their dense peak; mma.sync on
    Hopper reaches about two thirds of it (wgmma is needed for the rest), which the figures do not include.

    parts: "forward", "weight_grad" (with its reduction, the fp32 -> dtype cast and the bias sum),
    "input_grad". Needs a CUDA build of eit_fast._C (the plan is the CUDA launchers').
    """
    from ..perf_model import Work
    if not hasattr(torch.ops.eit_fast, "patch_projection_cuda_plan"):
        raise RuntimeError(f"the kernel model needs the CUDA build of eit_fast._C: {build_note()}")
    B, C, H, W = (int(v) for v in x_shape)
    pad = k // 2
    Hp, Wp = output_grid(H, W, k, stride, pad, pool)
    N, K, e = B * Hp * Wp, C * k * k, torch.empty((), dtype=dtype).element_size()
    rows = N * pool * pool
    BN, Dpad, Kpad, Kt, Dk, slices = torch.ops.eit_fast.patch_projection_cuda_plan([B, C, H, W], D, k, stride, pad,
                                                                                   pool, dtype)
    math = cuda_math(dtype)
    precision = {"bf16": "bf16", "fp16": "fp16", "tf32": "tf32"}.get(math)

    def gemm(flops, nbytes):
        return Work(bytes=nbytes, mma_flops=flops, precision=precision) if precision else             Work(bytes=nbytes, fma_flops=flops)

    x_bytes, tokens_bytes, argmax_bytes = B * C * H * W * e, N * D * e, N * D
    work = {}
    if "forward" in parts:
        work["pack weights"] = Work(bytes=D * K * e + Dpad * Kpad * e + D * e + Dpad * 4)
        work["forward"] = gemm(2 * rows * Kpad * Dpad, x_bytes + Dpad * Kpad * e + Dpad * 4 + tokens_bytes + argmax_bytes)
    if "weight_grad" in parts:
        workspace = slices * Kt * Dpad * 4
        work["weight gradient"] = gemm(2 * rows * Kt * Dpad, x_bytes + tokens_bytes + argmax_bytes + workspace)
        work["reduce slices"] = Work(bytes=workspace + D * K * 4)
        work["dW to dtype, bias sum"] = Work(bytes=D * K * (4 + e) + tokens_bytes + D * e)
    if "input_grad" in parts:
        dx = B * C * H * W * 4
        work["pack W^T, zero dx"] = Work(bytes=D * K * e + Kt * Dk * e + dx)
        work["input gradient"] = gemm(2 * rows * Kt * Dk, tokens_bytes + argmax_bytes + Kt * Dk * e + 2 * dx)
        work["dx to dtype"] = Work(bytes=dx + B * C * H * W * e)
    return work


def output_grid(h, w, k: int, stride: int, padding: int, pool: int):
    """(Hp, Wp): conv output (floor), then MaxPool2d(pool, pool) without padding (floor)."""
    return ((h + 2 * padding - k) // stride + 1) // pool, ((w + 2 * padding - k) // stride + 1) // pool


def patch_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int,
                     pool: int) -> torch.Tensor:
    """max_pool2d(conv2d(x, weight, bias, stride, padding), pool, pool) as tokens (B, Hp*Wp, D), row-major.

    Ties go to the first maximum in row-major window order and NaN propagates, as in PyTorch's max-pool.
    Raises RuntimeError naming the reason when this install has no kernel for x's device and dtype.
    """
    why = unsupported(x)
    if why is not None:
        raise RuntimeError(f"eit_fast patch_projection cannot run: {why}")
    return torch.ops.eit_fast.patch_projection(x, weight, bias, stride, padding, pool)[0]


if _C is not None:
    @torch.library.register_fake("eit_fast::patch_projection")
    def _(x, weight, bias, stride, padding, pool):
        hp, wp = output_grid(x.shape[2], x.shape[3], weight.shape[2], stride, padding, pool)
        shape = (x.shape[0], hp * wp, weight.shape[0])
        return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)

    @torch.library.register_fake("eit_fast::patch_projection_backward_weight")
    def _(grad, argmax, x, weight, stride, padding, pool):
        return weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])

    @torch.library.register_fake("eit_fast::patch_projection_backward_input")
    def _(grad, argmax, x, weight, stride, padding, pool):
        return x.new_empty(x.shape)

    def _setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, pool = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.geometry = (stride, padding, pool)
        ctx.mark_non_differentiable(output[1])

    def _backward(ctx, grad_out, _grad_argmax):
        x, weight, argmax = ctx.saved_tensors
        dx = dweight = dbias = None
        if grad_out is None:
            return dx, dweight, dbias, None, None, None
        grad_out = grad_out.contiguous()
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dweight, dbias = torch.ops.eit_fast.patch_projection_backward_weight(grad_out, argmax, x, weight,
                                                                                 *ctx.geometry)
        if ctx.needs_input_grad[0]:  # images rarely need a gradient: skip the fold-back unless asked
            dx = torch.ops.eit_fast.patch_projection_backward_input(grad_out, argmax, x, weight, *ctx.geometry)
        return dx, dweight, dbias, None, None, None

    torch.library.register_autograd("eit_fast::patch_projection", _backward, setup_context=_setup_context)
