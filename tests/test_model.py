import math

import pytest
import torch
import torch.nn.functional as F

import eit_fast
from eit_fast import InputError, create_model

# DESIGN.md 1.3: exact parameter counts (ImageNet-1K heads, no pre_logits).
PARAMS = {"eit_mini": 3_512_750, "eit_tiny": 8_927_230, "eit_base": 15_972_280, "eit_large": 25_305_592}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_exact_parameter_counts(name):
    assert eit_fast.count_params(create_model(name)) == PARAMS[name]


def authors_keys(cfg):
    """DESIGN.md 1.4: the authors' parameter names and shapes, derived from the config alone."""
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
    """An independent float64 re-statement of DESIGN.md 1.1-1.2, head by head, from the state_dict alone."""
    w = {k: v.double() for k, v in sd.items()}
    k, g, D, H = cfg.patch_kernel, cfg.grid_size, cfg.embed_dim, cfg.num_heads
    y = F.conv2d(x.double(), w["patch_embed.eit_p.conv.weight"], w["patch_embed.eit_p.conv.bias"],
                 stride=cfg.patch_stride, padding=k // 2)
    y = F.max_pool2d(y, cfg.pool)
    B = y.shape[0]
    t = torch.cat([w["cls_token"].expand(B, 1, D), y.reshape(B, D, g * g).transpose(1, 2)], dim=1)
    for i, (a, c) in enumerate(cfg.splits):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (D,), w[p + "norm1.weight"], w[p + "norm1.bias"], 1e-6)
        parts = []
        if c:  # the conv branch takes the first c channels; CLS passes through
            hc = h[..., :c]
            grid = hc[:, 1:].transpose(1, 2).reshape(B, c, g, g)
            conv = F.conv2d(grid, w[p + "eit_t.conv1.weight"], padding=1, groups=c)
            parts.append(torch.cat([hc[:, :1], conv.reshape(B, c, g * g).transpose(1, 2)], dim=1))
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
])
def test_reference_matches_independent_functional_model(name, overrides):
    model = randomize(create_model(name, **overrides)).double().eval()
    x = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size, dtype=torch.float64)
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
    ((1, 3, 224, 224), torch.float32, "this model was built for 32x32 images, got 224x224"),
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
