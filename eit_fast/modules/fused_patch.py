"""The fused EIT stem (fast path "patch_projection"): EITPatchEmbed with conv + max-pool + flatten done by
the one op eit_fast::patch_projection (eit_fast._C), which never writes the conv output. Same submodules and
parameters as the reference (patch_embed.eit_p.conv.*), so state dicts move unchanged.

Provider interface for eit_fast.runtime / eit_fast.patch: availability(), applies_to(model), swap(model, auto),
unswap(model); AutoFusedPatchEmbed is the impl="auto" class (eit_fast.autotune picks per case).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from ..autotune import AutoSelected
from ..models.eit import EITPatchEmbed
from ..ops import patch_projection as _op
from ..runtime import Verdict


class FusedPatchEmbed(EITPatchEmbed):
    """EITPatchEmbed computed by eit_fast::patch_projection; any input size, square or not.

    Its precision is that of the conv it replaces: bf16 / fp16 inputs (or autocast) on tensor cores with fp32
    accumulation; float32 on the GPU in TF32 when PyTorch's convolution setting allows it
    (torch.backends.cudnn.conv.fp32_precision, or torch.backends.cudnn.allow_tf32 before torch 2.9; TF32 is
    PyTorch's default for convolutions), exactly otherwise. The op reads that setting itself, as cuDNN does.

    Where this install has no kernel for the input's device and dtype (e.g. fp16 on the CPU, or CUDA tensors
    with a CPU-only build) it runs the reference computation and warns once, saying why.
    """

    @classmethod
    def from_reference(cls, ref: EITPatchEmbed) -> "FusedPatchEmbed":
        why = unsupported_stem(ref)
        if why is not None:
            raise ValueError(f"cannot fuse this stem: {why}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, value in vars(ref).items():  # plain attributes the reference may carry (sizes, flags)
            if not name.startswith("_") and name != "training":
                setattr(new, name, value)
        for name, child in ref.named_children():  # eit_p with its conv and pool: the same parameters
            setattr(new, name, child)
        new.train(ref.training)
        return new

    def forward(self, image):
        conv = self.eit_p.conv
        x, weight, bias = image, conv.weight, conv.bias
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # the reference conv would run in the autocast dtype
            dtype = torch.get_autocast_dtype(dev)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        elif x.dtype != weight.dtype:
            raise RuntimeError(f"input dtype {x.dtype} differs from the stem's weight dtype {weight.dtype}")
        why = _op.unsupported(x)
        if why is not None:
            _warn_fallback(why)
            return super().forward(image)  # exactly the reference, autocast included
        return _op.patch_projection(x, weight, bias, conv.stride[0], conv.padding[0], self.eit_p.pool.kernel_size)


_warned: set[str] = set()


def _warn_fallback(why: str):
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"fused patch projection: {why}; running the reference conv + max-pool instead",
                      RuntimeWarning, stacklevel=3)


def unsupported_stem(pe: nn.Module) -> str | None:
    """Why eit_fast::patch_projection cannot compute this stem, or None."""
    if not isinstance(pe, EITPatchEmbed):
        return f"the stem is {type(pe).__name__}, not EIT's conv + max-pool (EITPatchEmbed)"
    conv, pool = pe.eit_p.conv, pe.eit_p.pool
    if conv.bias is None:
        return "the stem conv has no bias"
    if (conv.groups, conv.dilation, conv.padding_mode) != (1, (1, 1), "zeros"):
        return "the stem conv is grouped, dilated or not zero-padded"
    if conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1] \
            or not isinstance(conv.padding, tuple) or conv.padding[0] != conv.padding[1]:
        return f"the stem conv is not square (kernel {conv.kernel_size}, stride {conv.stride}, padding {conv.padding})"
    p = pool.kernel_size
    if not isinstance(p, int) or pool.stride != p or pool.padding != 0 or pool.dilation != 1 or pool.ceil_mode:
        return "the stem pool is not MaxPool2d(p, stride p) without padding, dilation or ceil_mode"
    if p * p > 256:
        return f"pool {p} > 16 (the saved argmax is one byte)"
    return None


def availability() -> tuple[bool, str]:
    if not _op.loaded():
        return False, f"eit_fast._C is not built or failed to load ({_op.load_error()})"
    if _op.has_kernel("cuda"):
        return True, "eit_fast._C built with CPU+CUDA kernels"
    return True, f"eit_fast._C built with the CPU kernel only ({_op.build_note()})"


def applies_to(model) -> Verdict:
    """The one judge of whether `model`'s stem can be fused: from the stem module's own settings."""
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        return Verdict.absent("the model has no patch_embed")
    if isinstance(pe, FusedPatchEmbed):
        return Verdict.yes("already fused")
    if not isinstance(pe, EITPatchEmbed):
        return Verdict.absent(f"the stem is {type(pe).__name__}, not EIT's conv + max-pool (EITPatchEmbed)")
    why = unsupported_stem(pe)
    return Verdict.cannot(why) if why else Verdict.yes()


class AutoFusedPatchEmbed(AutoSelected, FusedPatchEmbed):
    """The fused stem under impl="auto": each case runs the path eit_fast.autotune measured faster."""

    fast_path = "patch_projection"
    _fused_forward = staticmethod(FusedPatchEmbed.forward)
    _reference_forward = staticmethod(EITPatchEmbed.forward)

    def case_key(self, args) -> tuple[int, str]:
        x = args[0]
        conv = self.eit_p.conv
        layout = "channels_last" if x.dim() == 4 and not x.is_contiguous() and \
            x.is_contiguous(memory_format=torch.channels_last) else "contiguous"
        return x.shape[0], (f"image={tuple(x.shape[1:])} {layout} kernel={conv.kernel_size[0]} "
                            f"stride={conv.stride[0]} pool={self.eit_p.pool.kernel_size} dim={conv.out_channels}")

    def cannot_run(self, args) -> str | None:
        x = args[0]
        dev = x.device.type
        if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):  # the dtype the fused forward computes in
            x = x.new_empty(0, dtype=torch.get_autocast_dtype(dev))
        return _op.unsupported(x)


def swap(model, auto: bool = False) -> int:
    """Make model.patch_embed the fused stem (the measured variant with auto=True); 1 if it changed."""
    pe = model.patch_embed
    cls = AutoFusedPatchEmbed if auto else FusedPatchEmbed
    if type(pe) is cls:
        return 0
    if isinstance(pe, FusedPatchEmbed):
        pe.__class__ = cls
        return 1
    model.patch_embed = FusedPatchEmbed.from_reference(pe)
    model.patch_embed.__class__ = cls
    return 1


def swapped(model) -> int:
    return int(isinstance(getattr(model, "patch_embed", None), FusedPatchEmbed))


def unswap(model) -> int:
    """Back to the reference EITPatchEmbed (same submodules and parameters); 1 if it changed."""
    pe = getattr(model, "patch_embed", None)
    if not isinstance(pe, FusedPatchEmbed):
        return 0
    pe.__class__ = EITPatchEmbed
    return 1
