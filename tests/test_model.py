import math

import pytest
import torch
import torch.nn.functional as F

import eit_fast
from eit_fast import InputError, create_model

# docs/design.md section 1.3: exact parameter counts (ImageNet-1K heads, no pre_logits).
PARAMS = {"eit_mini": 3_512_750, "eit_tiny": 8_927_230, "eit_base": 15_972_280, "eit_large": 25_305_592}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_exact_parameter_counts(name):
    assert eit_fast.count_params(create_model(name)) == PARAMS[name]


def authors_keys(cfg):
    """docs/design.md section 1.4: the authors' parameter names and shapes, derived from the config alone."""
    D, k, n = cfg.embed_dim, cfg.patch_kernel, cfg.in_chans
    keys = {"patch_embed.eit_p.conv.weight": (D, n, k, k), "patch_embed.eit_p.conv.bias": (D,),
            "cls_token": (1, 1, D)}
    for i, (a, c) in enumerate(cfg.splits):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "norm2.weight": (D,),
                     b + "norm2.bias": (D,), b + "attn.qkv.weight": (3 * a, a), b + "attn.qkv.bias": (3 * a,),
                     b + "attn.proj.weight": (a, a), b + "attn.proj.bias": (a,),
                     b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                     b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,)})
        if c:
            keys[b + "eit_t.conv1.weight"] = (c, 1, 3, 3)
    keys.update({"norm.weight": (D,), "norm.bias": (D,), "head.weight": (cfg.num_classes, D),
                 "head.bias": (cfg.num_classes,)})
    return keys


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_state_dict_matches_authors_names_and_shapes(name):
    model = create_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == authors_keys(model.cfg)
    assert "blocks.%d.eit_t.conv1.weight" % (model.cfg.depth - 1) not in got


def functional_eit(sd, cfg, x):
    """An independent float64 re-statement of docs/design.md section 1.1-1.2, head by head, from the state_dict alone."""
    w = {k: v.double() for k, v in sd.items()}
    k, D, H = cfg.patch_kernel, cfg.embed_dim, cfg.num_heads
    gh, gw = cfg.grid_hw
    y = F.conv2d(x.double(), w["patch_embed.eit_p.conv.weight"], w["patch_embed.eit_p.conv.bias"],
                 stride=cfg.patch_stride, padding=k // 2)
    y = F.max_pool2d(y, cfg.pool)
    B = y.shape[0]
    t = torch.cat([w["cls_token"].expand(B, 1, D), y.reshape(B, D, gh * gw).transpose(1, 2)], dim=1)
    for i, (a, c) in enumerate(cfg.splits):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (D,), w[p + "norm1.weight"], w[p + "norm1.bias"], 1e-6)
        parts = []
        if c:  # the conv branch takes the first c channels; CLS passes through
            hc = h[..., :c]
            grid = hc[:, 1:].transpose(1, 2).reshape(B, c, gh, gw)
            conv = F.conv2d(grid, w[p + "eit_t.conv1.weight"], padding=1, groups=c)
            parts.append(torch.cat([hc[:, :1], conv.reshape(B, c, gh * gw).transpose(1, 2)], dim=1))
        if a:
            q, kk, v = F.linear(h[..., c:], w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"]).split(a, dim=-1)
            hd = a // H
            heads = []
            for j in range(H):
                s = slice(j * hd, (j + 1) * hd)
                att = torch.softmax(q[..., s] @ kk[..., s].transpose(1, 2) / math.sqrt(hd), dim=-1)
                heads.append(att @ v[..., s])
            parts.append(F.linear(torch.cat(heads, -1), w[p + "attn.proj.weight"], w[p + "attn.proj.bias"]))
        t = t + torch.cat(parts, dim=-1)
        h = F.layer_norm(t, (D,), w[p + "norm2.weight"], w[p + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])),
                     w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        t = t + h
    t = F.layer_norm(t, (D,), w["norm.weight"], w["norm.bias"], 1e-6)
    return F.linear(t[:, 0], w["head.weight"], w["head.bias"])


def randomize(model):
    """Random values everywhere (init leaves biases at zero, which would hide bias bugs)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("name, overrides", [
    ("eit_cifar", {}),
    ("eit_mini", {"num_classes": 7}),
    ("eit_cifar", {"embed_dim": 40, "num_heads": 10}),   # first layer is conv-only
    ("eit_cifar", {"img_size": (24, 40)}),               # non-square: a 6x10 token grid
])
def test_reference_matches_independent_functional_model(name, overrides):
    model = randomize(create_model(name, **overrides)).double().eval()
    x = torch.randn(2, 3, *model.cfg.img_hw, dtype=torch.float64)
    ref = functional_eit(model.state_dict(), model.cfg, x)
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", eit_fast.list_models())
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_forward_backward_cpu(name, amp):
    model = create_model(name).train()
    cfg = model.cfg
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    target = torch.randint(0, cfg.num_classes, (2,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
        loss = F.cross_entropy(logits, target)
    assert logits.shape == (2, cfg.num_classes)
    assert logits.dtype == (torch.bfloat16 if amp else torch.float32)
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.dtype == torch.float32
    # A gradient everywhere a parameter matters: the stem, a conv branch and the head are all non-zero.
    assert next(model.patch_embed.parameters()).grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0
    if cfg.conv_split:
        assert model.blocks[0].eit_t.conv1.weight.grad.abs().sum() > 0


def test_bf16_autocast_tracks_fp32():
    model = randomize(create_model("eit_cifar")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x).float()
    rel = (low - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_authors_init():
    torch.manual_seed(1)
    model = create_model("eit_base")
    qkv = model.blocks[3].attn.qkv
    assert abs(qkv.weight.std().item() - 0.01) < 0.001  # timm's trunc_normal_: bounds +-2 absolute
    assert (qkv.bias == 0).all() and (model.head.bias == 0).all()
    assert abs(model.cls_token.std().item() - 0.02) < 0.005
    assert (model.norm.weight == 1).all() and (model.norm.bias == 0).all()
    conv = model.patch_embed.eit_p.conv.weight  # kaiming normal, fan_out: std = sqrt(2 / (D * k * k))
    assert abs(conv.std().item() / math.sqrt(2 / (400 * 16 * 16)) - 1) < 0.02
    dw = model.blocks[0].eit_t.conv1.weight    # torch's fan_out ignores groups: 368 * 3 * 3
    assert abs(dw.std().item() / math.sqrt(2 / (368 * 9)) - 1) < 0.1


def test_drop_path_rates_rise_linearly_and_act_only_in_training():
    model = create_model("eit_cifar")
    rates = [b.drop_path.p for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_optional_positional_embedding_uses_conv_pool_token_count():
    model = create_model("eit_mini", pos_embed=True)
    assert model.pos_embed.shape == (1, 362, 250)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    small = create_model("eit_mini", pos_embed=True, img_size=96)  # conv 25x25 -> pool 8x8
    assert small.pos_embed.shape == (1, 65, 250)


def test_optional_pre_logits():
    model = create_model("eit_mini", pre_logits=768)
    assert model.state_dict()["pre_logits.fc.weight"].shape == (768, 250)
    assert model.head.weight.shape == (1000, 768)
    assert eit_fast.count_params(model) == PARAMS["eit_mini"] + 250 * 768 + 768 + (768 - 250) * 1000


def test_vit_twin_is_a_plain_vit():
    model = create_model("vit_cifar")
    assert not any("eit_t" in k for k in model.state_dict())
    assert model.patch_embed.proj.kernel_size == (4, 4) and model.patch_embed.proj.stride == (4, 4)
    assert model.pos_embed.shape == (1, 65, 250)


@pytest.mark.parametrize("shape, dtype, message", [
    ((1, 3, 224, 224), torch.float32, "this model was built for 32x32 images, got 224x224; build it with "
                                      "img_size=(224, 224), or with dynamic_img_size=True"),
    ((1, 1, 32, 32), torch.float32, "expected 3 input channels, got 1"),
    ((3, 32, 32), torch.float32, "expected a 4-D image batch (B, C, H, W), got shape (3, 32, 32)"),
    ((1, 3, 32, 33), torch.float32, "got 32x33"),
    ((1, 3, 32, 32), torch.uint8, "expected a floating-point image tensor, got dtype torch.uint8"),
])
def test_bad_input(shape, dtype, message):
    model = create_model("eit_cifar")
    with pytest.raises(InputError) as e:
        model(torch.zeros(shape, dtype=dtype))
    assert message in str(e.value)


# --- any image size ----------------------------------------------------------------------------------------

def test_dynamic_img_size_agrees_with_a_model_built_for_that_size():
    """Issue 10: one eit_mini runs at 224 px and at 160x256, and agrees with a model built for 160x256."""
    model = randomize(create_model("eit_mini", dynamic_img_size=True)).eval()
    fixed = create_model("eit_mini")
    wide = create_model("eit_mini", img_size=(160, 256))
    fixed.load_state_dict(model.state_dict())
    wide.load_state_dict(model.state_dict())  # no positional embedding: the same weights fit any size
    assert wide.cfg.grid_hw == (13, 21) and wide.eval().patch_embed.grid(160, 256) == (13, 21)
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(model(x), fixed.eval()(x), rtol=0, atol=0)
        x = torch.randn(1, 3, 160, 256)
        torch.testing.assert_close(model(x), wide(x), rtol=1e-5, atol=1e-6)
        assert not torch.equal(model(x), model(x[..., :, :224]))  # the size reaches the output


def test_dynamic_img_size_interpolates_a_learned_positional_embedding():
    from eit_fast.models.eit import resample_pos_embed
    model = randomize(create_model("vit_cifar", dynamic_img_size=True)).eval()
    built = create_model("vit_cifar", img_size=(48, 64)).eval()
    sd = model.state_dict()
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], (12, 16), (8, 8))
    built.load_state_dict(sd)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), built(x), rtol=1e-5, atol=1e-5)
        # At the built size the embedding is used as it is (no resampling round trip).
        fixed = create_model("vit_cifar").eval()
        fixed.load_state_dict(model.state_dict())
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(model(x), fixed(x))


def test_resample_pos_embed_keeps_cls_and_is_identity_at_the_same_size():
    from eit_fast.models.eit import resample_pos_embed
    pos = torch.randn(1, 1 + 6 * 4, 8)
    same = resample_pos_embed(pos, (6, 4), (6, 4))
    torch.testing.assert_close(same, pos, rtol=1e-5, atol=1e-5)
    big = resample_pos_embed(pos, (12, 8), (6, 4))
    assert big.shape == (1, 1 + 96, 8) and torch.equal(big[:, :1], pos[:, :1])


@pytest.mark.parametrize("name, size, message", [
    ("eit_cifar", (1, 3, 2, 2), "a 2x2 image is too small for this stem: it gives no patch token (at least 4"),
    ("vit_cifar", (1, 3, 3, 32), "a 3x32 image is too small"),
])
def test_dynamic_img_size_refuses_images_without_a_token(name, size, message):
    model = create_model(name, dynamic_img_size=True)
    with pytest.raises(InputError) as e:
        model(torch.zeros(size))
    assert message in str(e.value)


# --- timm's model API (without timm) ---------------------------------------------------------------------

@pytest.mark.parametrize("name, reduction", [("eit_mini", 12), ("vit_mini", 16), ("eit_micro", 4),
                                             ("vit_cifar", 4)])
def test_timm_attributes(name, reduction):
    model = create_model(name)
    D, depth = model.cfg.embed_dim, model.cfg.depth
    assert (model.num_features, model.embed_dim, model.head_hidden_size) == (D, D, D)
    assert (model.num_prefix_tokens, model.global_pool, model.num_classes) == (1, "token", model.cfg.num_classes)
    assert model.feature_info == [dict(module=f"blocks.{i}", num_chs=D, reduction=reduction) for i in range(depth)]
    assert dict(model.named_modules())["blocks.0"] is model.blocks[0]
    assert model.get_classifier() is model.head
    assert model.pretrained_cfg["input_size"] == (3, *model.cfg.img_hw)
    assert model.pretrained_cfg["architecture"] == name
    assert create_model(name, pre_logits=64).head_hidden_size == 64


def test_pooled_features_and_pooling_modes():
    model = randomize(create_model("eit_micro")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 65, 96)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
        torch.testing.assert_close(model(x), model.head(tokens[:, 0]))
        for pool, pooled in [("token", tokens[:, 0]), ("avg", tokens[:, 1:].mean(1)), ("", tokens)]:
            feats = create_model("eit_micro", num_classes=0, global_pool=pool).eval()
            feats.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
            assert isinstance(feats.head, torch.nn.Identity) and feats.num_classes == 0
            torch.testing.assert_close(feats(x), pooled, rtol=0, atol=0)


def test_reset_classifier():
    model = randomize(create_model("eit_micro")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), tokens[:, 0], rtol=0, atol=0)
        assert model.num_classes == 0 and model.cfg.num_classes == 0
        model.reset_classifier(5, global_pool="avg")
        assert model.head.weight.shape == (5, 96) and (model.head.bias == 0).all()
        torch.testing.assert_close(model(x), model.head(tokens[:, 1:].mean(1)))
        assert (model.cfg.num_classes, model.cfg.global_pool, model.global_pool) == (5, "avg", "avg")
    # The new config rebuilds the same architecture (checkpoints carry model.cfg).
    eit_fast.EIT(model.cfg).load_state_dict(model.state_dict())
    with pytest.raises(eit_fast.ConfigError, match=r"global_pool must be one of \('token', 'avg', ''\), got 'max'"):
        model.reset_classifier(5, global_pool="max")
    with pytest.raises(eit_fast.ConfigError, match="num_classes must be a non-negative integer"):
        model.reset_classifier(-1)


def test_reset_classifier_keeps_device_dtype_and_mode():
    model = create_model("eit_micro", dtype=torch.float64).train()
    model.reset_classifier(3)
    assert model.head.weight.dtype == torch.float64 and model.head.training


def test_device_and_dtype_build_in_place():
    meta = create_model("eit_mini", device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert eit_fast.count_params(meta) == PARAMS["eit_mini"]
    low = create_model("eit_micro", dtype=torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert low(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["eit_micro", "vit_cifar"])
def test_grad_checkpointing_recomputes_blocks_and_gives_equal_gradients(name):
    model = randomize(create_model(name, drop_path_rate=0.3, attn_drop_rate=0.2)).train()
    x = torch.randn(3, 3, 32, 32)
    calls = []
    for blk in model.blocks:  # a pre-hook: the recomputation may stop before a block's end
        blk.register_forward_pre_hook(lambda *_: calls.append(1))

    def grads(enable):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        calls.clear()
        torch.manual_seed(7)  # the same dropout and drop-path draws in both runs
        model(x).square().mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert plain_calls == model.cfg.depth and ckpt_calls == 2 * model.cfg.depth  # recomputed in backward
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)


def block_outputs(model, x):
    """Each block's output, caught by forward hooks."""
    outs = []
    handles = [blk.register_forward_hook(lambda m, args, out: outs.append(out)) for blk in model.blocks]
    with torch.no_grad():
        final = model.forward_features(x)
    for h in handles:
        h.remove()
    return final, outs


@pytest.mark.parametrize("name, size", [("eit_micro", (32, 32)), ("eit_micro", (24, 40)), ("vit_cifar", (32, 32))])
def test_forward_intermediates_match_hooks_on_the_blocks(name, size):
    model = randomize(create_model(name, dynamic_img_size=True)).eval()
    x = torch.randn(2, 3, *size)
    final, outs = block_outputs(model, x)
    gh, gw = model.patch_embed.grid(*size)
    D, depth = model.embed_dim, model.cfg.depth
    with torch.no_grad():
        last, maps = model.forward_intermediates(x)
        torch.testing.assert_close(last, final, rtol=0, atol=0)
        assert len(maps) == depth
        for y, ref in zip(maps, outs):
            assert y.shape == (2, D, gh, gw) and y.is_contiguous()
            torch.testing.assert_close(y, ref[:, 1:].transpose(1, 2).reshape(2, D, gh, gw), rtol=0, atol=0)
        nlc = model.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", norm=True, intermediates_only=True)
        assert len(nlc) == 2
        torch.testing.assert_close(nlc[0], model.norm(outs[0])[:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(nlc[1], final[:, 1:], rtol=0, atol=0)
        pairs = model.forward_intermediates(x, indices=2, return_prefix_tokens=True, intermediates_only=True)
        assert [p[1].shape for p in pairs] == [(2, 1, D)] * 2
        torch.testing.assert_close(pairs[0][1], outs[depth - 2][:, :1], rtol=0, atol=0)
        d = model.forward_intermediates(x, indices=1, output_dict=True, return_prefix_tokens=True, stop_early=True)
        assert set(d) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
        torch.testing.assert_close(d["image_features"], final, rtol=0, atol=0)


def test_forward_intermediates_stop_early_and_bad_arguments():
    model = create_model("eit_micro").eval()
    calls = []
    model.blocks[-1].register_forward_hook(lambda *_: calls.append(1))
    model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[1], stop_early=True, intermediates_only=True)
    assert calls == []
    with pytest.raises(ValueError, match=r"feature index 4 is out of range \(0 to 3\)"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[4])
    with pytest.raises(ValueError, match=r"last-n \(5\) is out of range \(1 to 4\)"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=5)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NHWC")
    with pytest.raises(InputError, match="expected 3 input channels, got 1"):
        model.forward_intermediates(torch.randn(1, 1, 32, 32))


def test_prune_intermediate_layers():
    model = randomize(create_model("eit_micro")).eval()
    x = torch.randn(2, 3, 32, 32)
    want = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert model.prune_intermediate_layers([0, -3], prune_norm=True) == [0, 1]
    assert len(model.blocks) == 2 and isinstance(model.norm, torch.nn.Identity)
    assert isinstance(model.head, torch.nn.Identity) and model.global_pool == ""
    got = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_group_matcher_covers_stem_blocks_and_norm():
    import re
    model = create_model("vit_cifar")
    m = model.group_matcher()
    stem = [k for k, _ in model.named_parameters() if re.match(m["stem"], k)]
    assert sorted(stem) == ["cls_token", "patch_embed.proj.bias", "patch_embed.proj.weight", "pos_embed"]
    block_re = m["blocks"][0][0]
    assert {int(re.match(block_re, k).group(1)) for k, _ in model.named_parameters() if re.match(block_re, k)} == \
        set(range(5))


def test_eit_fast_needs_no_timm():
    """timm is optional: without it eit_fast imports and builds models; features_only says what it needs."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['timm'] = None\n"
            "import torch, eit_fast\n"
            "assert not hasattr(eit_fast, 'timm_models')\n"
            "assert eit_fast.create_model('eit_micro', num_classes=0)(torch.randn(1, 3, 32, 32)).shape == (1, 96)\n"
            "try:\n    eit_fast.create_model('eit_micro', features_only=True)\n"
            "except ImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "features_only=True wraps the model in timm's feature extractor: pip install timm" in r.stdout
