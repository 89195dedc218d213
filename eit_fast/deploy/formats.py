"""The export formats: how each writes the reference model and how it is loaded back to be checked.

  onnx              .onnx   standard ONNX operators, onnxruntime / TensorRT (eit_fast.deploy.onnx)
  torchscript       .torchscript.pt  torch.jit.script; loads with torch.jit.load, no eit_fast needed
  exported-program  .pt2    torch.export with a dynamic batch (and size); loads with torch.export.load
  safetensors       .safetensors  the weights with their config and class names (eit_fast.evaluate and
                    eit_fast.export read it back); the same file `python -m eit_fast.train` writes at the end

Every format carries the metadata of eit_fast.deploy.metadata (TorchScript and ExportedProgram as an
`eit_fast.json` extra file in the archive).
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn
from torch.export import Dim

from . import onnx as _onnx
from .base import EXAMPLE_BATCH, ExportError, dynamic_size, example_input

EXTRA_FILE = "eit_fast.json"
Runner = Callable[[torch.Tensor], torch.Tensor]


def _write_onnx(ref: nn.Module, tmp: str, meta: Mapping[str, str], opset: int):
    program = _onnx.export_onnx(ref, opset)
    _onnx.save_onnx(program, tmp, meta)
    problems = _onnx.graph_problems(tmp, ref, opset)
    if problems:
        raise ExportError(f"the ONNX graph is not what eit_fast promises: {'; '.join(problems)}")


def _write_torchscript(ref: nn.Module, tmp: str, meta: Mapping[str, str], opset: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still supported
        try:
            scripted = torch.jit.script(ref)
        except Exception as e:
            raise ExportError(f"torch.jit.script failed ({type(e).__name__}: {str(e).strip().splitlines()[0]})") from e
        torch.jit.save(scripted, tmp, _extra_files={EXTRA_FILE: json.dumps(dict(meta))})


def _load_torchscript(path: str) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location="cpu")


def export_dims(model: nn.Module) -> dict:
    dims = {0: Dim.DYNAMIC}
    if dynamic_size(model):
        dims.update({2: Dim.DYNAMIC, 3: Dim.DYNAMIC})
    return dims


def _write_exported_program(ref: nn.Module, tmp: str, meta: Mapping[str, str], opset: int):
    try:
        program = torch.export.export(ref, (example_input(ref, EXAMPLE_BATCH),), dynamic_shapes=(export_dims(ref),))
    except Exception as e:
        raise ExportError(f"torch.export failed ({type(e).__name__}: {str(e).strip().splitlines()[0]})") from e
    buf = io.BytesIO()  # a buffer: torch.export.save warns about a file name that does not end in .pt2
    torch.export.save(program, buf, extra_files={EXTRA_FILE: json.dumps(dict(meta))})
    Path(tmp).write_bytes(buf.getvalue())


def _load_exported_program(path: str) -> Runner:
    return torch.export.load(io.BytesIO(Path(path).read_bytes())).module()


def _write_safetensors(ref: nn.Module, tmp: str, meta: Mapping[str, str], opset: int):
    from ..checkpoint import save_safetensors
    save_safetensors(tmp, ref, meta)


def _load_safetensors(path: str) -> Runner:
    """The model the file's own metadata describes, with its weights (what evaluate rebuilds from it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..checkpoint import load_state_dict_checked
    from ..factory import model_from_config
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    model = model_from_config(json.loads(meta["config"]))
    load_state_dict_checked(model, load_file(path), source=path)
    return model.eval()


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    write: Callable[[nn.Module, str, Mapping[str, str], int], None]  # (reference model, path, metadata, opset)
    load: Callable[[str], Runner]
    what: str  # what runs the written file, for messages


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", ".onnx", _write_onnx, _onnx.OnnxRunner, "onnxruntime"),
    Format("safetensors", ".safetensors", _write_safetensors, _load_safetensors, "the model rebuilt from the file"),
    Format("torchscript", ".torchscript.pt", _write_torchscript, _load_torchscript, "torch.jit.load"),
    Format("exported-program", ".pt2", _write_exported_program, _load_exported_program, "torch.export.load"),
)}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ExportError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}") from None


def read_metadata(path: str | Path, fmt: str) -> dict[str, str]:
    """The eit_fast metadata an exported file carries."""
    path = str(path)
    if fmt == "onnx":
        return _onnx.read_metadata(path)
    if fmt == "safetensors":
        from ..checkpoint import read_safetensors_metadata
        return read_safetensors_metadata(path)
    extra = {EXTRA_FILE: ""}
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(path, map_location="cpu", _extra_files=extra)
    else:
        torch.export.load(io.BytesIO(Path(path).read_bytes()), extra_files=extra)
    return json.loads(extra[EXTRA_FILE])
