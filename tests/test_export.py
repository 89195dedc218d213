"""Export: TorchScript, FX and torch.export give the eager model's outputs; input checks stay eager-only."""
import warnings

import pytest
import torch
import torch.fx
from torch.export import Dim, export

from eit_fast import InputError, create_model

CASES = [("eit_micro", {}), ("vit_cifar", {}), ("eit_micro", {"dynamic_img_size": True}),
         ("vit_cifar", {"dynamic_img_size": True}), ("eit_micro", {"pos_embed": True, "dynamic_img_size": True}),
         ("eit_micro", {"num_classes": 0, "global_pool": "avg"}), ("eit_cifar", {"embed_dim": 40})]
IDS = ["eit", "vit", "eit-dynamic", "vit-dynamic", "eit-pos-dynamic", "eit-avg-features", "eit-conv-only-layer"]


def model_for(name, overrides):
    torch.manual_seed(0)
    model = create_model(name, **overrides).eval()
    with torch.no_grad():  # random values everywhere, so no zero-initialised bias hides a difference
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def sizes(overrides):
    return [(2, 3, 32, 32)] + ([(1, 3, 24, 40), (3, 3, 48, 32)] if overrides.get("dynamic_img_size") else [])


def assert_same(exported, model, overrides):
    with torch.no_grad():
        for shape in sizes(overrides):
            x = torch.randn(shape)
            torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, overrides", CASES, ids=IDS)
def test_torchscript_equals_eager(name, overrides):
    model = model_for(name, overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
        scripted = torch.jit.script(model)
    assert_same(scripted, model, overrides)


@pytest.mark.parametrize("name, overrides", CASES, ids=IDS)
def test_fx_trace_equals_eager(name, overrides):
    model = model_for(name, overrides)
    graph = torch.fx.symbolic_trace(model)
    assert_same(graph, model, overrides)
    # Eager-only checks did not enter the graph, and the eager model still checks.
    assert not any("check_input" in str(n.target) for n in graph.graph.nodes)
    with pytest.raises(InputError, match="expected 3 input channels"):
        model(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("name, overrides", CASES[:4], ids=IDS[:4])  # export is the slow one: 4 cases
def test_torch_export_equals_eager(name, overrides):
    model = model_for(name, overrides)
    x = torch.randn(2, 3, 32, 32)
    if overrides.get("dynamic_img_size"):
        dims = {0: Dim("batch", max=64), 2: 8 * Dim("h8", min=2, max=16), 3: 8 * Dim("w8", min=2, max=16)}
        program = export(model, (x,), dynamic_shapes=(dims,))
    else:
        program = export(model, (x,))
    assert_same(program.module(), model, overrides)


def test_torch_jit_trace_skips_the_checks():
    model = model_for("eit_micro", {})
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
    assert "check_input" not in traced.code
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)


def test_torch_export_of_the_fused_stem_keeps_the_custom_op():
    """The fused model is the same class with swapped modules; export sees its ops through their fake kernels."""
    from eit_fast.modules import fused_patch
    if not fused_patch.availability()[0]:
        pytest.skip("the fused stem cannot run here (eit_fast._C not built)")
    model = create_model("eit_micro", dynamic_img_size=True).eval()
    fused_patch.swap(model)  # the fused stem alone, always used (impl="fused" would also demand the blocks')
    assert type(model.patch_embed) is fused_patch.FusedPatchEmbed
    x = torch.randn(2, 3, 32, 32)
    dims = {0: Dim("batch", max=64), 2: 8 * Dim("h8", min=2, max=16), 3: 8 * Dim("w8", min=2, max=16)}
    program = export(model, (x,), dynamic_shapes=(dims,))
    assert any("eit_fast.patch_projection" in str(n.target) for n in program.graph.nodes)
    assert_same(program.module(), model, {"dynamic_img_size": True})


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_export_model_of_a_fused_model_holds_the_reference_ops(fmt, tmp_path):
    """eit_fast.deploy.export_model writes the fused model's reference math: no eit_fast op in the archive,
    so it loads without eit_fast, and the same outputs as the fused model at other batch sizes."""
    from eit_fast.deploy import export_model, load_exported
    model = model_for("eit_micro", {"depth": 2, "impl": "auto"})
    from eit_fast.modules.fused_patch import FusedPatchEmbed
    if not isinstance(model.patch_embed, FusedPatchEmbed):
        pytest.skip("the fused stem cannot run here (eit_fast._C not built)")
    path = tmp_path / "m.bin"
    result = export_model(model, path, fmt)
    assert result["check"]["relative"] == 0.0
    assert isinstance(model.patch_embed, FusedPatchEmbed)  # the model itself stays fused
    loaded = load_exported(path, fmt)
    if fmt == "exported-program":
        ops = [str(n.target) for n in loaded.graph.nodes if n.op == "call_function"]
    else:
        ops = [n.kind() for n in loaded.inlined_graph.nodes()]
    assert not [op for op in ops if "eit_fast" in op] and any("max_pool2d" in op for op in ops), ops
    with torch.no_grad():
        for b in (1, 3):
            x = torch.randn(b, 3, 32, 32)
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
