"""eit_fast as a timm citizen: registration, timm.create_model options, and our model API against timm's own
(the vit_* twins against timm's VisionTransformer with the same weights). Skips without timm."""
import re

import pytest
import torch
import torch.nn.functional as F

import eit_fast
from eit_fast import EIT, get_config

timm = pytest.importorskip("timm")
from timm.data import resolve_data_config, resolve_model_data_config  # noqa: E402
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models import get_pretrained_cfg, group_parameters  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

NAMES = eit_fast.list_models()


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def test_every_model_is_registered_with_a_full_pretrained_cfg():
    assert set(NAMES) <= set(timm.list_models())
    for name in NAMES:
        cfg, pc = get_config(name), get_pretrained_cfg(name)
        assert pc.architecture == name and not pc.has_weights
        assert pc.input_size == (3, *cfg.img_hw) and pc.fixed_input_size and pc.num_classes == cfg.num_classes
        assert pc.crop_pct == (0.875 if cfg.img_size == 224 else 1.0) and pc.interpolation == "bicubic"
        assert pc.mean == (0.485, 0.456, 0.406) and pc.std == (0.229, 0.224, 0.225)
        assert pc.first_conv == ("patch_embed.proj" if name.startswith("vit") else "patch_embed.eit_p.conv")
        assert pc.classifier == "head" and pc.license and pc.paper_ids == "arXiv:2203.07116"
        assert pc.origin_url == "https://github.com/MrHaiPi/EIT" and "No hub weights" in pc.notes[0]
        # min_input_size is the smallest image that gives a token.
        m = pc.min_input_size[1]
        embed = EIT(cfg, device="meta").patch_embed
        assert embed.grid(m, m) == (1, 1) and min(embed.grid(m - 1, m - 1)) == 0


@pytest.mark.parametrize("name", NAMES)
def test_timm_create_model_forward_backward(name):
    model = timm.create_model(name, device="meta")  # the full-size model, without the cost of its init
    ref = eit_fast.create_model(name, device="meta")
    assert type(model) is EIT and model.cfg == ref.cfg and model.impl == "reference"
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert model.pretrained_cfg["architecture"] == name
    # Forward and backward through timm's path; the 224 px models at 64 px keep this fast.
    small = timm.create_model(name, img_size=64 if model.cfg.img_size == 224 else 32, num_classes=7).train()
    x = torch.randn(2, 3, *small.cfg.img_hw)
    loss = F.cross_entropy(small(x), torch.tensor([1, 6]))
    loss.backward()
    for pname, p in small.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert small.head.weight.grad.abs().sum() > 0 and small.cls_token.grad.abs().sum() > 0


def test_timm_create_model_options():
    feats = timm.create_model("eit_micro", num_classes=0, global_pool="avg")
    x = torch.randn(2, 3, 32, 32)
    assert feats(x).shape == (2, 96) and feats.global_pool == "avg"
    meta = timm.create_model("eit_mini", device="meta", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in meta.parameters()} == {("meta", torch.bfloat16)}
    wide = timm.create_model("eit_mini", img_size=(160, 256), num_classes=3)
    assert wide.cfg.img_hw == (160, 256) and wide(torch.randn(1, 3, 160, 256)).shape == (1, 3)
    dyn = timm.create_model("eit_micro", dynamic_img_size=True)
    assert dyn(torch.randn(1, 3, 40, 24)).shape == (1, 10) and not dyn._traits["fixed_input_size"]
    overlay = timm.create_model("eit_micro", pretrained_cfg_overlay=dict(crop_pct=0.9))
    assert overlay.pretrained_cfg["crop_pct"] == 0.9
    with pytest.raises(TypeError, match=r"unknown config option\(s\) \['heads'\]"):
        timm.create_model("eit_micro", heads=4)
    with pytest.raises(eit_fast.ConfigError, match="global_pool must be one of"):
        timm.create_model("eit_micro", global_pool="max")


def test_pretrained_true_names_checkpoint_path():
    with pytest.raises(RuntimeError) as e:
        timm.create_model("eit_mini", pretrained=True)
    assert "no hub weights" in str(e.value) and "checkpoint_path=" in str(e.value)
    assert "eit_fast.create_model('eit_mini', checkpoint_path=PATH)" in str(e.value)


def test_data_config_follows_the_model():
    for model in (timm.create_model("eit_micro"), eit_fast.create_model("eit_micro")):
        assert resolve_data_config(model=model)["input_size"] == (3, 32, 32)
        assert resolve_data_config(model=model)["crop_pct"] == 1.0
        assert resolve_model_data_config(model)["input_size"] == (3, 32, 32)
    mini = resolve_data_config(model=timm.create_model("eit_mini"))
    assert (mini["input_size"], mini["crop_pct"], mini["interpolation"]) == ((3, 224, 224), 0.875, "bicubic")
    assert resolve_data_config(model=eit_fast.create_model("eit_mini", img_size=(160, 256)))["input_size"] == \
        (3, 160, 256)


@pytest.mark.parametrize("name", ["eit_micro", "vit_cifar"])
def test_features_only(name):
    feats = randomize(timm.create_model(name, features_only=True)).eval()  # eit_micro has drop-path
    D = get_config(name).embed_dim
    assert feats.feature_info.channels() == [D] * 3 and feats.feature_info.reduction() == [4] * 3
    assert len(feats.model.blocks) == get_config(name).depth  # default: the last 3 blocks
    x = torch.randn(2, 3, 32, 32)
    maps = feats(x)
    assert [tuple(m.shape) for m in maps] == [(2, D, 8, 8)] * 3
    full = eit_fast.create_model(name)
    missing, unexpected = full.load_state_dict(feats.model.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    want = full.eval().forward_intermediates(x, indices=3, intermediates_only=True)
    for a, b in zip(maps, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Chosen blocks: the extractor drops the ones after the last needed.
    two = timm.create_model(name, features_only=True, out_indices=(0, 2))
    assert len(two.model.blocks) == 3 and [m.shape[1] for m in two(x)] == [D, D]
    ours = eit_fast.create_model(name, features_only=True, out_indices=(0, 2))
    assert type(ours) is type(two) and len(ours.model.blocks) == 3 and len(ours(x)) == 2


def test_layer_decay_gives_per_layer_groups():
    model = timm.create_model("eit_micro")
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {}
    names = {id(p): k for k, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            scale[names[id(p)]] = group["lr_scale"]
    # stem 0, blocks 1..4 (the final norm with the last block), head last: 0.5 ** (5 - layer)
    assert scale["patch_embed.eit_p.conv.weight"] == scale["cls_token"] == 0.5 ** 5
    for i in range(4):
        assert scale[f"blocks.{i}.mlp.fc1.weight"] == scale[f"blocks.{i}.norm1.bias"] == 0.5 ** (4 - i)
    assert scale["norm.weight"] == 0.5 and scale["head.weight"] == 1.0


# --- the vit_* twins against timm's own VisionTransformer, same weights ------------------------------------

def timm_vit(model, **kwargs):
    cfg = model.cfg
    vit = VisionTransformer(img_size=cfg.img_hw, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                            depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                            num_classes=cfg.num_classes, global_pool=cfg.global_pool or "", fc_norm=False,
                            dynamic_img_size=cfg.dynamic_img_size, **kwargs)
    vit.load_state_dict(model.state_dict())
    return vit.eval()


@pytest.mark.parametrize("overrides, size", [({}, (32, 32)), ({"global_pool": "avg"}, (32, 32)),
                                             ({"dynamic_img_size": True}, (48, 64)),
                                             ({"dynamic_img_size": True, "num_classes": 0}, (24, 40))])
def test_vit_twin_equals_timm_vision_transformer(overrides, size):
    # float64, so that their SDPA and our explicit attention agree to rounding
    # vit_cifar narrowed to 60 channels (6 heads) to keep float64 quick
    ours = randomize(timm.create_model("vit_cifar", dtype=torch.float64, embed_dim=60, num_heads=6,
                                       **overrides)).eval()
    theirs = timm_vit(ours, dtype=torch.float64)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
        tok = ours.forward_features(x)
        torch.testing.assert_close(ours.forward_head(tok, pre_logits=True),
                                   theirs.forward_head(tok, pre_logits=True), rtol=0, atol=0)
        for kw in [{}, dict(indices=2, output_fmt="NLC", norm=True), dict(indices=[0, -1], return_prefix_tokens=True),
                   dict(indices=1, output_dict=True, return_prefix_tokens=True), dict(stop_early=True, indices=[1])]:
            a, b = ours.forward_intermediates(x, **kw), theirs.forward_intermediates(x, **kw)
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        ours.reset_classifier(0)
        theirs.reset_classifier(0)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    assert ours.prune_intermediate_layers([1, -2]) == theirs.prune_intermediate_layers([1, -2]) == [1, 3]
    assert len(ours.blocks) == len(theirs.blocks) == 4


def test_vit_twin_groups_like_timm():
    ours = timm.create_model("vit_cifar")
    theirs = timm_vit(ours)
    assert group_parameters(ours, ours.group_matcher()) == group_parameters(theirs, theirs.group_matcher())
    assert group_parameters(ours, ours.group_matcher(), reverse=True) == \
        group_parameters(theirs, theirs.group_matcher(), reverse=True)
    assert (ours.num_features, ours.head_hidden_size, ours.embed_dim, ours.num_prefix_tokens) == \
        (theirs.num_features, theirs.head_hidden_size, theirs.embed_dim, theirs.num_prefix_tokens)
    assert ours.feature_info == theirs.feature_info
    assert ours.no_weight_decay() <= theirs.no_weight_decay()


def test_resample_pos_embed_equals_timm():
    from eit_fast.models.eit import resample_pos_embed
    pos = torch.randn(1, 1 + 8 * 8, 16)
    for new in [(12, 16), (5, 9), (8, 8)]:
        torch.testing.assert_close(resample_pos_embed(pos, new, (8, 8)),
                                   resample_abs_pos_embed(pos, list(new), [8, 8], num_prefix_tokens=1),
                                   rtol=1e-6, atol=1e-6)


def test_authors_checkpoint_loads_into_a_timm_built_model(tmp_path):
    src = randomize(eit_fast.create_model("eit_micro"))
    torch.save({"model": src.state_dict(), "epoch": 3}, tmp_path / "authors.pth")
    model = timm.create_model("eit_micro")
    eit_fast.load_checkpoint(model, tmp_path / "authors.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), src.state_dict().values()))
    assert re.search(r"eit_fast\.load_checkpoint", get_pretrained_cfg("eit_micro").notes[0])


@pytest.mark.slow
def test_readme_timm_example_runs(tmp_path, monkeypatch):
    """The README's timm section, run as written (with an authors'-style checkpoint where it loads one)."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("\n## timm\n")[1]
    code = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    assert 'eit_fast.load_checkpoint(model, "best_checkpoint.pth")' in code
    authors = {"model": eit_fast.create_model("eit_mini").state_dict(), "epoch": 299}
    torch.save(authors, tmp_path / "best_checkpoint.pth")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["model"].num_classes == 10 and scope["cfg"]["input_size"] == (3, 224, 224)
    assert [tuple(f.shape) for f in scope["feats"](torch.randn(1, 3, 224, 224))] == [(1, 250, 19, 19)] * 2
    assert scope["pooled"].shape == (1, 250) and scope["wide"].shape == (1, 1000)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = scope["model"](x)
        for exported in (scope["scripted"], scope["graph"], scope["program"].module()):
            torch.testing.assert_close(exported(x), want, rtol=1e-5, atol=1e-5)
