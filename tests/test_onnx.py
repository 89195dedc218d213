"""ONNX export of every model eit_fast builds, fused or not: standard ONNX operators only, a dynamic batch
(and image size), the preprocessing in the metadata, and onnxruntime's outputs matching PyTorch's.

The default suite exports each family (eit_cifar, eit_mini, vit_cifar: create_model(name, impl) as it is)
built with impl="reference" and impl="auto" (here: the fused C++ stem where eit_fast._C is built), one
dynamic-size model, and a model whose blocks are fused Triton kernels (under TRITON_INTERPRET=1, in a child
process); those two have 2 blocks (a mixed one and a pure-attention one) to keep the exports short. The slow
cases export every named config, the baseline, and the lowest and newest opsets.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import eit_fast
from eit_fast.deploy import ExportError, check_runtime, deploy_metadata, export_model, load_exported, read_metadata
from eit_fast.deploy.onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, check_opset
from eit_fast.modules.fused_block import FusedBlock
from eit_fast.modules.fused_patch import FusedPatchEmbed

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # the bound for fp32 onnxruntime against PyTorch (seen: 1e-7 to 1e-6)
FAMILIES = ("eit_cifar", "eit_mini", "vit_cifar")  # the named configs as they are (eit_mini at 224 px)
CASES = [(name, impl) for name in FAMILIES for impl in ("reference", "auto")]


def build(name, impl, **overrides):
    """The named model with random values in every parameter, so no zero-initialised bias hides a difference."""
    torch.manual_seed(0)
    model = eit_fast.create_model(name, impl=impl, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def classes_for(model):
    return [f"class {i}" for i in range(model.cfg.num_classes)]


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])


def all_nodes(proto):
    nodes = list(proto.graph.node)
    for f in proto.functions:
        nodes += list(f.node)
    return nodes


def assert_standard_graph(path, stem):
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    nodes = all_nodes(proto)
    assert not proto.functions
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}, {n.domain for n in nodes}
    assert not [n for n in nodes if "eit_fast" in f"{n.domain}::{n.op_type}".lower()]
    ops = {n.op_type for n in nodes}
    expected = {"Conv", "MatMul", "Softmax", "LayerNormalization"} | ({"MaxPool"} if stem == "eit" else set())
    assert expected <= ops, ops
    assert [o.version for o in proto.opset_import if o.domain == ""] == [DEFAULT_OPSET]
    return proto


def input_dims(proto):
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{i}" for n, i in CASES])
def family(request, tmp_path_factory):
    name, impl = request.param
    model = build(name, impl)
    path = tmp_path_factory.mktemp("onnx") / f"{name}-{impl}.onnx"
    before = {k: type(m) for k, m in model.named_modules()}
    result = export_model(model, path, "onnx", name=name, classes=classes_for(model))
    return dict(name=name, impl=impl, model=model, path=path, result=result, before=before)


def test_family_matches_pytorch_in_onnxruntime(family):
    model, path = family["model"], family["path"]
    if family["impl"] == "auto" and eit_fast.info()["fast_paths"]["patch_projection"]["available"] \
            and model.cfg.stem == "eit":
        assert isinstance(model.patch_embed, FusedPatchEmbed)  # the fused model itself is what is exported
    h, w = model.img_size
    for batch in (1, 3):  # the traced batch is 2
        x = torch.randn(batch, 3, h, w)
        with torch.no_grad():
            ref = model(x)  # the model as built: fused modules and all
        assert rel_err(run_onnx(path, x), ref) < TOL
    check = family["result"]["check"]
    assert check["relative"] < TOL and check["images"] > 0 and family["result"]["note"] is None


def test_family_graph_is_standard_onnx_with_a_dynamic_batch(family):
    proto = assert_standard_graph(family["path"], family["model"].cfg.stem)
    h, w = family["model"].img_size
    assert input_dims(proto) == ["batch", 3, h, w]
    assert [o.name for o in proto.graph.output] == ["logits"]


def test_family_metadata_has_the_preprocessing_and_classes(family):
    model = family["model"]
    meta = read_metadata(family["path"], "onnx")
    h, w = model.img_size
    assert json.loads(meta["input_size"]) == [3, h, w]
    assert json.loads(meta["mean"]) == list(model.pretrained_cfg["mean"])
    assert json.loads(meta["std"]) == list(model.pretrained_cfg["std"])
    assert meta["interpolation"] == model.pretrained_cfg["interpolation"] == "bicubic"
    assert json.loads(meta["crop_pct"]) == model.pretrained_cfg["crop_pct"]
    assert meta["crop_mode"] == "center" and json.loads(meta["fixed_input_size"]) is True
    assert json.loads(meta["classes"]) == classes_for(model)
    assert meta["model"] == family["name"]
    assert eit_fast.EITConfig(**json.loads(meta["config"])) == model.cfg  # the config rebuilds the model
    assert "preprocessing" in meta and f"{h}x{w}" in meta["preprocessing"]


def test_family_export_leaves_the_model_as_it_was(family):
    model = family["model"]
    assert {k: type(m) for k, m in model.named_modules()} == family["before"]
    assert not model.training


def test_dynamic_image_size_runs_other_sizes(tmp_path):
    """EIT's conv branch on a run-time token grid and a learned positional embedding resized (ONNX Resize)."""
    model = build("eit_micro", "auto", depth=2, dynamic_img_size=True, pos_embed=True)
    model.train()  # export takes the eval-mode graph whatever mode the model is in, and leaves the mode alone
    path = tmp_path / "dyn.onnx"
    result = export_model(model, path, "onnx")
    assert model.training
    model.eval()
    proto = assert_standard_graph(path, "eit")
    assert input_dims(proto) == ["batch", 3, "height", "width"]
    assert "Resize" in {n.op_type for n in proto.graph.node}
    assert json.loads(read_metadata(path, "onnx")["fixed_input_size"]) is False
    for shape in [(1, 3, 32, 32), (3, 3, 24, 40), (2, 3, 33, 37), (1, 3, 12, 12)]:
        x = torch.randn(shape)
        with torch.no_grad():
            ref = model(x)
        assert rel_err(run_onnx(path, x), ref) < TOL, shape
    assert (1, 3, 48, 35) in result["check"]["shapes"]  # the export's own check ran another size too


def test_fused_blocks_export_under_the_interpreter(tmp_path):
    """TRITON_INTERPRET=1: auto fuses the blocks on the CPU (Triton kernels interpreted); the export still
    holds the reference math, and onnxruntime matches the fused kernels' own outputs."""
    script = textwrap.dedent(f"""
        import json, torch, eit_fast, onnx, onnxruntime as ort
        from eit_fast.deploy import export_model
        from eit_fast.modules.fused_block import FusedBlock
        torch.manual_seed(0)
        auto = eit_fast.create_model("eit_micro", impl="auto", depth=2)
        with torch.no_grad():
            for p in auto.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
        fused_before = [isinstance(b, FusedBlock) for b in auto.blocks]
        export_model(auto, {str(tmp_path / 'fused.onnx')!r}, "onnx", check=False)
        fused = eit_fast.create_model("eit_micro", impl="fused", depth=2).eval()  # runs the interpreted kernels
        fused.load_state_dict(auto.state_dict())
        x = torch.randn(1, 3, 32, 32)  # not the traced batch (2); one image keeps the interpreted run short
        with torch.no_grad():
            ref = fused(x)
        sess = ort.InferenceSession({str(tmp_path / 'fused.onnx')!r}, providers=["CPUExecutionProvider"])
        out = torch.from_numpy(sess.run(None, {{"image": x.numpy()}})[0])
        proto = onnx.load({str(tmp_path / 'fused.onnx')!r})
        print("RESULT " + json.dumps(dict(
            fused_before=fused_before, fused_after=[isinstance(b, FusedBlock) for b in auto.blocks],
            fused_kernel_blocks=[isinstance(b, FusedBlock) for b in fused.blocks],
            rel=((out - ref).norm() / ref.norm()).item(), finite=bool(torch.isfinite(out).all()),
            domains=sorted({{n.domain for n in proto.graph.node}}),
            ops=sorted({{n.op_type for n in proto.graph.node}}))))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900,
                       cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stderr[-4000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert all(res["fused_before"]) and all(res["fused_after"]) and all(res["fused_kernel_blocks"]), res
    assert res["domains"] == [""] and not [op for op in res["ops"] if "eit_fast" in op.lower()], res
    assert res["finite"] and res["rel"] < TOL, res


def test_opset_outside_the_range_is_refused():
    for bad in (MIN_OPSET - 1, MAX_OPSET + 1):
        with pytest.raises(ExportError, match=f"opset {bad} is not available"):
            check_opset(bad)
    check_opset(MIN_OPSET)


def test_missing_packages_are_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    note = check_runtime("onnx")
    assert note.startswith("not checked against PyTorch: onnxruntime is not installed") and "[onnx]" in note
    with pytest.raises(ExportError, match="needs onnxruntime"):
        check_runtime("onnx", need_runner=True)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ExportError, match=r"ONNX export needs onnxscript: pip install 'eit_fast\[onnx\]'"):
        check_runtime("onnx")
    with pytest.raises(ExportError, match="unknown format 'tflite'"):
        check_runtime("tflite")


def test_a_model_eit_fast_did_not_build_is_refused(tmp_path):
    pytest.importorskip("timm")
    wrapped = eit_fast.create_model("eit_micro", depth=1, features_only=True, out_indices=1)
    with pytest.raises(ExportError, match="cannot export a FeatureGetterNet"):
        export_model(wrapped, tmp_path / "f.onnx")
    assert not list(tmp_path.iterdir())


def test_metadata_without_classes_and_a_class_count_mismatch():
    model = eit_fast.create_model("eit_micro")
    with pytest.raises(ValueError, match="3 class names for a model with 10 outputs"):
        deploy_metadata(model, classes=["a", "b", "c"])
    meta = deploy_metadata(model)
    assert "classes" not in meta and meta["model"] == "eit_micro" and meta["output_name"] == "logits"


# --- slow: every named config at its own size, the baseline, the opset range ----------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", eit_fast.list_models())
def test_every_named_config_exports_and_matches(name, tmp_path):
    model = build(name, "auto")
    path = tmp_path / f"{name}.onnx"
    export_model(model, path, "onnx", name=name, batch_size=1)
    assert_standard_graph(path, model.cfg.stem)
    h, w = model.img_size
    for batch in (1, 3):
        x = torch.randn(batch, 3, h, w)
        with torch.no_grad():
            ref = model(x)
        assert rel_err(run_onnx(path, x), ref) < TOL, batch


@pytest.mark.slow
def test_vit_dynamic_image_size(tmp_path):
    model = build("vit_cifar", "auto", dynamic_img_size=True)
    path = tmp_path / "vit.onnx"
    export_model(model, path, "onnx")
    for shape in [(1, 3, 24, 40), (3, 3, 48, 32), (2, 3, 36, 44)]:
        x = torch.randn(shape)
        with torch.no_grad():
            ref = model(x)
        assert rel_err(run_onnx(path, x), ref) < TOL, shape


@pytest.mark.slow
def test_baseline_exports(tmp_path):
    pytest.importorskip("torchvision")
    from eit_fast.factory import create_trainable
    torch.manual_seed(0)
    model = create_trainable("resnet18_cifar").eval()
    path = tmp_path / "resnet.onnx"
    result = export_model(model, path, "onnx", name="resnet18_cifar")
    assert result["check"]["relative"] < TOL
    assert read_metadata(path, "onnx")["model"] == "resnet18_cifar"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(load_exported(path, "onnx")(x), model(x)) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("opset", [MIN_OPSET, MAX_OPSET])
def test_opset_range(opset, tmp_path):
    """The ends of the accepted range export, hold that opset, and run in onnxruntime (the export's check)."""
    model = build("eit_micro", "reference", depth=2)
    path = tmp_path / "m.onnx"
    result = export_model(model, path, "onnx", opset=opset)
    assert result["check"]["relative"] < TOL
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain == ""] == [opset]
