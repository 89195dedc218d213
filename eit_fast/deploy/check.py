"""Does the exported file compute what PyTorch computes? On a few images, and over a whole data set.

Error measure as everywhere in eit_fast (docs/design.md section 5): ||out - ref|| / ||ref|| and the max
absolute difference. An fp32 export passes at a relative error of at most 1e-4 (onnxruntime reorders sums,
so it is not bitwise; seen: about 1e-7 to 1e-6), with every value finite.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .base import ExportError, dynamic_size, in_chans, input_hw

TOLERANCE = 1e-4
CHECK_BATCH_MAX = 8  # "a few images": a large --batch-size is for --validate, not for the check
Runner = Callable[[torch.Tensor], torch.Tensor]


def check_inputs(model: nn.Module, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Seeded images at batch sizes other than the traced one (batch_size and 1, or 1 and 3), and for a
    model built with dynamic_img_size also at another, odd, image size."""
    g = torch.Generator().manual_seed(seed)
    h, w = input_hw(model)
    c = in_chans(model)
    batches = (batch_size, 1) if batch_size != 1 else (1, 3)
    shapes = [(b, c, h, w) for b in batches]
    if dynamic_size(model):
        shapes.append((batches[1], c, h + h // 2, w + 3))
    return [torch.randn(s, generator=g) for s in shapes]


@torch.no_grad()
def compare(model: nn.Module, run: Runner, inputs: list[torch.Tensor]) -> dict:
    """Run `model` and the exported `run` on each input; the worst relative and absolute differences."""
    worst_rel, worst_abs = 0.0, 0.0
    for x in inputs:
        ref = model(x).float()
        out = run(x)
        if not isinstance(out, torch.Tensor):
            raise ExportError(f"the exported model returned a {type(out).__name__}, not a tensor")
        out = out.float()
        if out.shape != ref.shape:
            raise ExportError(f"the exported model gives shape {tuple(out.shape)} for input {tuple(x.shape)}, "
                              f"PyTorch {tuple(ref.shape)}")
        if not torch.isfinite(out).all():
            raise ExportError(f"the exported model gives NaN/inf for input {tuple(x.shape)}")
        diff = out - ref
        worst_abs = max(worst_abs, diff.abs().max().item())
        worst_rel = max(worst_rel, (diff.norm() / ref.norm().clamp_min(1e-30)).item())
    return {"max_abs": worst_abs, "relative": worst_rel, "images": sum(len(x) for x in inputs),
            "shapes": [tuple(x.shape) for x in inputs]}


def assert_close(result: dict, what: str):
    if not result["relative"] <= TOLERANCE:
        raise ExportError(f"the {what} differs from PyTorch: relative error {result['relative']:.2e} > "
                          f"{TOLERANCE:g} (max abs difference {result['max_abs']:.2e}); nothing was written")


@torch.no_grad()
def validate(model: nn.Module, run: Runner, loader) -> dict:
    """Top-1 of PyTorch and of the export over every batch of `loader` (as timm's onnx_validate.py), how
    often their predictions agree, and the largest logit difference."""
    model.eval()
    n = hits_ref = hits_out = agree = 0
    worst = 0.0
    for batch in loader.batches(0):
        x = batch.images.to("cpu", torch.float32)
        labels = batch.labels.cpu()
        ref, out = model(x).float(), run(x).float()
        if not torch.isfinite(out).all():
            raise ExportError("the exported model gives NaN/inf on the validation images")
        p_ref, p_out = ref.argmax(-1), out.argmax(-1)
        hits_ref += int((p_ref == labels).sum())
        hits_out += int((p_out == labels).sum())
        agree += int((p_ref == p_out).sum())
        worst = max(worst, (out - ref).abs().max().item())
        n += len(labels)
    if n == 0:
        raise ExportError("the validation set is empty")
    return {"images": n, "top1_pytorch": 100.0 * hits_ref / n, "top1_export": 100.0 * hits_out / n,
            "agree": 100.0 * agree / n, "max_abs": worst}
