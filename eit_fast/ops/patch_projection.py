"""eit_fast::patch_projection: Conv2d(k, stride, padding) then MaxPool2d(pool), as one op writing tokens
(B, Hp*Wp, D) (EIT-P, DESIGN.md 1.1).

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
