"""ONNX: the reference model through torch.onnx's dynamo exporter, checked graph, onnxruntime runner.

Fused models export through their reference copy (eit_fast.deploy.base.reference_copy) rather than through
ONNX translations of the custom ops: the reference modules are the oracle the fused kernels are tested
against, so exporting them needs no second implementation of the math in ONNX script to keep in step
(docs/design.md section 3). The graph holds standard ONNX operators only (Conv, MaxPool, MatMul, Softmax,
LayerNormalization, ...), with a dynamic batch, and a dynamic height and width for models built with
dynamic_img_size. Opset 18 by default (torch's exporter's own; LayerNormalization needs 17); 17 to 25 are
accepted, the range tested with torch 2.14.1 and onnxruntime 1.32 (from 26 on the exporter writes Gelu
nodes that onnxruntime 1.32 rejects).
"""
from __future__ import annotations

import importlib
from typing import Mapping, Optional

import torch
import torch.nn as nn

from .base import EXAMPLE_BATCH, ExportError, dynamic_size, example_input, output_name
from .metadata import INPUT_NAME

DEFAULT_OPSET = 18
MIN_OPSET = 17          # LayerNormalization
MAX_OPSET = 25          # the newest that torch 2.14.1 exports and onnxruntime 1.32 runs
STANDARD_DOMAINS = ("", "ai.onnx")
INSTALL = "pip install 'eit_fast[onnx]' (onnx, onnxscript, onnxruntime)"


def missing(*packages: str) -> list[str]:
    """The packages of `packages` that cannot be imported."""
    out = []
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def max_opset() -> int:
    """MAX_OPSET, or less where the installed onnx package knows no newer opset."""
    import onnx
    return min(MAX_OPSET, onnx.defs.onnx_opset_version())


def check_opset(opset: int):
    if missing("onnx"):
        return
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise ExportError(f"opset {opset} is not available: eit_fast exports opset {MIN_OPSET} (LayerNormalization) "
                          f"to {top} (the newest tested with onnxruntime); the default is {DEFAULT_OPSET}")


def dynamic_axes(model: nn.Module) -> dict[int, str]:
    axes = {0: "batch"}
    if dynamic_size(model):
        axes.update({2: "height", 3: "width"})
    return axes


def export_onnx(ref: nn.Module, opset: int = DEFAULT_OPSET):
    """torch.onnx.ONNXProgram of the reference model `ref` (see base.reference_copy), in memory."""
    gone = missing("onnx", "onnxscript")
    if gone:
        raise ExportError(f"ONNX export needs {' and '.join(gone)}: {INSTALL}")
    check_opset(opset)
    try:
        program = torch.onnx.export(ref, (example_input(ref, EXAMPLE_BATCH),), dynamo=True, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=[output_name(ref)],
                                    dynamic_shapes=(dynamic_axes(ref),), verbose=False)
    except Exception as e:  # the exporter's errors are long; the first line says what failed
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.onnx.export failed ({type(e).__name__}: {first})") from e
    return program


def save_onnx(program, path: str, metadata: Mapping[str, str]):
    """Write `program` as one self-contained .onnx file (no external data) with `metadata` in metadata_props."""
    program.model.metadata_props.update(metadata)
    if "preprocessing" in metadata:
        program.model.doc_string = "eit_fast export. Preprocessing: " + metadata["preprocessing"]
    program.save(path, external_data=False)


def _nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # If / Loop / Scan bodies
            if attr.g is not None and attr.g.node:
                yield from _nodes(attr.g)
            for g in attr.graphs:
                yield from _nodes(g)


def graph_problems(path: str, ref: nn.Module, opset: int) -> list[str]:
    """What is wrong with the written graph: operators outside the standard ONNX domain (an eit_fast custom op
    would be one), another opset than asked for, a batch or image size fixed where it should be dynamic."""
    import onnx
    proto = onnx.load(path)
    try:
        onnx.checker.check_model(proto, full_check=False)
    except onnx.checker.ValidationError as e:
        return [f"onnx.checker: {str(e).splitlines()[0]}"]
    problems = []
    ops = {f"{n.domain}::{n.op_type}" for n in _nodes(proto.graph) if n.domain not in STANDARD_DOMAINS}
    for f in proto.functions:
        ops |= {f"{n.domain}::{n.op_type}" for n in f.node if n.domain not in STANDARD_DOMAINS}
        ops.add(f"{f.domain}::{f.name} (a local function)")
    if ops:
        problems.append(f"non-standard operators {sorted(ops)}")
    got = {o.domain: o.version for o in proto.opset_import}
    if got.get("", got.get("ai.onnx")) != opset:
        problems.append(f"opset {got.get('', got.get('ai.onnx'))} instead of the requested {opset}")
    inputs = [i for i in proto.graph.input if i.name == INPUT_NAME]
    if not inputs:
        problems.append(f"no graph input named {INPUT_NAME!r}")
    else:
        dims = inputs[0].type.tensor_type.shape.dim
        fixed = [name for axis, name in dynamic_axes(ref).items() if not dims[axis].dim_param]
        if fixed:
            problems.append(f"the {', '.join(fixed)} dimension(s) are fixed, not dynamic")
    return problems


class OnnxRunner:
    """An onnxruntime CPU session called like a model: tensor in, tensor out."""

    def __init__(self, path: str):
        gone = missing("onnxruntime")
        if gone:
            raise ExportError(f"running the ONNX file needs onnxruntime: {INSTALL}")
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ExportError(f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0]}") from e
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        try:
            out = self.session.run(None, feed)[0]
        except Exception as e:
            raise ExportError(f"onnxruntime failed on input {tuple(x.shape)}: {str(e).strip().splitlines()[0]}") from e
        return torch.from_numpy(out)


def read_metadata(path: str) -> dict[str, str]:
    """The metadata_props of an ONNX file."""
    import onnx
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def opset_of(path: str) -> Optional[int]:
    import onnx
    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), None)
