"""What every export format needs: the model as reference math, its input size, the example input, the error.

Export runs on a copy of the model with every fused module turned back into its reference module
(`eit_fast.unpatch`): the same parameters, so the same function, written in standard operators only. The
exported graph therefore never holds an `eit_fast::` custom op and runs without eit_fast installed.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import unwrap
from ..patching import unpatch

EXAMPLE_BATCH = 2  # torch.export specialises a size-1 dimension, so the traced batch is 2 and marked dynamic


class ExportError(Exception):
    """An export that cannot be made or does not compute what the model computes; one line for the user.

    Not a RuntimeError/OSError on purpose: fileio.atomic_write lets it through, removing the temporary file,
    so a failed check never leaves a file behind."""


def reference_copy(model: nn.Module) -> nn.Module:
    """A CPU float32 copy of `model` (DDP / torch.compile wrappers removed) in eval mode with every fused
    module swapped back to its reference module; `model` itself is untouched."""
    model = unwrap(model)
    if not hasattr(model, "cfg"):
        raise ExportError(f"cannot export a {type(model).__name__}: export takes a model eit_fast built "
                          f"(create_model / a checkpoint), whose config says its input size; a features_only "
                          f"wrapper is not one (export the model itself)")
    ref = copy.deepcopy(model)
    unpatch(ref)
    return ref.to("cpu", torch.float32).eval()


def input_hw(model: nn.Module) -> tuple[int, int]:
    """The (H, W) the model was built for."""
    size = model.cfg.img_size
    return (size, size) if isinstance(size, int) else tuple(size)


def in_chans(model: nn.Module) -> int:
    return model.cfg.in_chans


def dynamic_size(model: nn.Module) -> bool:
    """Whether the model takes any image size (built with dynamic_img_size=True)."""
    return bool(getattr(model, "dynamic_img_size", False))


def example_input(model: nn.Module, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    h, w = input_hw(model)
    return torch.randn(batch, in_chans(model), h, w, generator=torch.Generator().manual_seed(0))


def output_name(model: nn.Module) -> str:
    return "logits" if getattr(model.cfg, "num_classes", 1) else "features"


def check_output_path(path) -> None:
    """Refuse, before any export work, an output path that is a folder or cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise ExportError(f"the output {p} is a folder; give a file name (e.g. {p / 'model.onnx'})")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {p}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {p}: no write permission in {parent}")
