"""Deploying a model: ONNX, TorchScript, ExportedProgram or safetensors, checked against PyTorch.

`export_model(model, path, "onnx")` takes any model eit_fast builds (reference, fused or auto; EIT, ViT
twin or baseline) and writes the reference math of it (fused modules swapped back on a copy, see
eit_fast.deploy.base). The file is written atomically (eit_fast.fileio): before it is moved into place it is
loaded back and run against PyTorch on a few images at other batch sizes (and another image size for
dynamic_img_size models); a mismatch raises ExportError and leaves nothing behind. The command line is
`python -m eit_fast.export`.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import torch.nn as nn

from ..fileio import atomic_write
from .base import ExportError, check_output_path, reference_copy
from .check import CHECK_BATCH_MAX, TOLERANCE, assert_close, check_inputs, compare, validate
from .formats import FORMATS, get_format, read_metadata
from .metadata import deploy_metadata
from .onnx import DEFAULT_OPSET, INSTALL, check_opset, missing

__all__ = ["export_model", "load_exported", "read_metadata", "reference_copy", "deploy_metadata", "validate",
           "compare", "check_inputs", "ExportError", "FORMATS", "DEFAULT_OPSET", "TOLERANCE"]


def check_runtime(fmt: str, need_runner: bool = False) -> Optional[str]:
    """Raise ExportError if `fmt` cannot be written here (or run, with need_runner); otherwise return a note
    when the written file cannot be checked here (ONNX without onnxruntime), else None."""
    get_format(fmt)
    if fmt != "onnx":
        return None
    gone = missing("onnx", "onnxscript")
    if gone:
        raise ExportError(f"ONNX export needs {' and '.join(gone)}: {INSTALL}")
    if missing("onnxruntime"):
        if need_runner:
            raise ExportError(f"running the ONNX export needs onnxruntime: {INSTALL}")
        return f"not checked against PyTorch: onnxruntime is not installed ({INSTALL})"
    return None


def export_model(model: nn.Module, path: str | os.PathLike, format: str = "onnx", *, opset: int = DEFAULT_OPSET,
                 name: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                 metadata: Optional[Mapping[str, str]] = None, check: bool = True, batch_size: int = 4) -> dict:
    """Write `model` to `path` in `format` (one of FORMATS) and check it; returns what was done:
    {"path", "format", "bytes", "check": compare()'s result or None, "note": why not checked or None}.

    name, classes: recorded in the metadata (eit_fast.deploy.metadata), with the preprocessing.
    metadata: extra string entries. check: load the written file and compare it with PyTorch (at batch
    sizes min(batch_size, CHECK_BATCH_MAX) and 1) before it is moved into place. ONNX: opset `opset`; the check needs onnxruntime
    and is skipped, with a note, without it.
    """
    fmt = get_format(format)
    note = check_runtime(format) if check else "not checked (check=False)"
    if format == "onnx":
        check_opset(opset)
    check_output_path(path)
    ref = reference_copy(model)
    meta = deploy_metadata(ref, name=name, classes=classes, extra=metadata)
    result = {"path": str(path), "format": format, "check": None, "note": note}

    def write(tmp: str):
        fmt.write(ref, tmp, meta, opset)
        if note is None:
            r = compare(ref, fmt.load(tmp), check_inputs(ref, min(batch_size, CHECK_BATCH_MAX)))
            assert_close(r, f"{format} export")
            result["check"] = r

    atomic_write(path, write, what=f"{format} export")
    result["bytes"] = os.path.getsize(path)
    return result


def load_exported(path: str | os.PathLike, format: str):
    """The written file as a callable (tensor in, tensor out): onnxruntime for ONNX, torch.jit.load,
    torch.export.load(...).module(), or the model rebuilt from a safetensors file."""
    return get_format(format).load(str(path))
