"""Model options beyond the paper (issue 12, issue 11's init): multi-CLS, low-rank q/k/v, impulse init, init rules."""
import json
import math

import pytest
import torch

import eit_fast
from eit_fast import ConfigError, ImplError, create_model
from eit_fast.checkpoint import save_checkpoint, save_safetensors
from eit_fast.evaluate import load_model_for_eval
from eit_fast.models.eit import Attention
from eit_fast.models.impulse import pseudo_input, shift_targets


def params(name, **kw):
    return eit_fast.count_params(create_model(name, **kw))


# --- parameter counts: each option changes the count by exactly its formula ------------------------------

@pytest.mark.parametrize("name", ["eit_micro", "vit_cifar"])
@pytest.mark.parametrize("n", [2, 4])
def test_num_cls_tokens_parameter_formula(name, n):
    cfg = eit_fast.get_config(name)
    D, classes = cfg.embed_dim, cfg.num_classes
    extra_tokens = (n - 1) * D * (2 if cfg.pos_embed else 1)  # the CLS tokens, and their pos_embed rows
    assert params(name, num_cls_tokens=n) - params(name) == extra_tokens + (n - 1) * D * classes
    # "avg" pooling reads the patch tokens: the head keeps its D inputs
    assert params(name, num_cls_tokens=n, global_pool="avg") - params(name, global_pool="avg") == extra_tokens


@pytest.mark.parametrize("name", ["eit_micro", "vit_cifar"])
@pytest.mark.parametrize("ranks", [dict(q_rank=32), dict(k_rank=8, v_rank=60), dict(q_rank=16, k_rank=16,
                                                                                        v_rank=16)])
def test_low_rank_parameter_formula(name, ranks):
    cfg = eit_fast.get_config(name)
    want = 0
    for a, _ in cfg.splits:  # a*a + a (full) -> a*r + r*a + a, where the rank is below the width
        want += sum(2 * a * r - a * a for r in ranks.values() if r < a)
    assert params(name, **ranks) - params(name) == want


@pytest.mark.parametrize("kw", [dict(attn_init="impulse"), dict(init="timm"), dict(init="torch"),
                                dict(attn_init="impulse", impulse_window=5, init="torch")])
def test_init_options_keep_parameter_count_and_names(kw):
    base = create_model("eit_micro").state_dict()
    got = create_model("eit_micro", **kw).state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in base.items()}


def test_low_rank_macs_formula():
    base = eit_fast.get_config("eit_micro")
    low = base.replace(q_rank=32, v_rank=16)
    N = base.num_tokens
    want = sum(N * (2 * a * r - a * a) for a, _ in base.splits for r in (32, 16) if r < a)
    b, m = eit_fast.count_macs(base), eit_fast.count_macs(low)
    assert (m.authors - b.authors, m.attn_matmul) == (want, b.attn_matmul)


def test_low_rank_parameter_names_and_full_layers():
    model = create_model("eit_micro", q_rank=32)  # widths 24, 48, 72, 96: block 0 keeps its full qkv
    sd = model.state_dict()
    assert "blocks.0.attn.qkv.weight" in sd and "blocks.0.attn.qkv.q.down.weight" not in sd
    assert sd["blocks.1.attn.qkv.q.down.weight"].shape == (32, 48)
    assert sd["blocks.1.attn.qkv.q.up.weight"].shape == (48, 32)
    assert sd["blocks.1.attn.qkv.q.up.bias"].shape == (48,)
    assert "blocks.1.attn.qkv.q.down.bias" not in sd
    assert sd["blocks.1.attn.qkv.k.weight"].shape == (48, 48)
    assert sd["blocks.1.attn.qkv.v.bias"].shape == (48,)


# --- numerics ---------------------------------------------------------------------------------------------

def test_low_rank_attention_equals_merged_full_projection():
    torch.manual_seed(1)
    low = Attention(40, 4, ranks=(8, None, 12)).double()
    full = Attention(40, 4).double()
    q, k, v = low.qkv.q, low.qkv.k, low.qkv.v
    with torch.no_grad():
        full.qkv.weight.copy_(torch.cat([q.up.weight @ q.down.weight, k.weight, v.up.weight @ v.down.weight]))
        full.qkv.bias.copy_(torch.cat([q.up.bias, k.bias, v.up.bias]))
        full.proj.load_state_dict(low.proj.state_dict())
    x = torch.randn(2, 17, 40, dtype=torch.float64)
    torch.testing.assert_close(low(x), full(x), rtol=1e-12, atol=1e-12)
    assert torch.linalg.matrix_rank(full.qkv.weight[:40]) == 8


def test_multi_cls_tokens_forward():
    n = 3
    model = create_model("eit_micro", num_cls_tokens=n).double().eval()
    D = model.embed_dim
    assert (model.num_prefix_tokens, model.num_features, model.head_hidden_size) == (n, D, n * D)
    assert model.head.in_features == n * D
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    feats = model.forward_features(x)
    assert feats.shape == (2, n + 64, D)
    torch.testing.assert_close(model(x), model.head(feats[:, :n].reshape(2, n * D)))
    # the conv branch passes every CLS token's channels through unchanged
    blk = model.blocks[0]
    y = torch.randn(2, n + 64, blk.conv_dim, dtype=torch.float64)
    out = blk.eit_t(y, (8, 8))
    torch.testing.assert_close(out[:, :n], y[:, :n])
    grid = y[:, n:].transpose(1, 2).reshape(2, blk.conv_dim, 8, 8)
    torch.testing.assert_close(out[:, n:], blk.eit_t.conv1(grid).flatten(2).transpose(1, 2))
    # timm's intermediates strip all n prefix tokens; "avg" pools the patch tokens only
    final, inter = model.forward_intermediates(x, indices=[1], return_prefix_tokens=True)
    (maps, prefix), = inter
    assert maps.shape == (2, D, 8, 8) and prefix.shape == (2, n, D)
    model.reset_classifier(0, "avg")
    assert model.head_hidden_size == D
    torch.testing.assert_close(model(x), feats[:, n:].mean(1))


def test_multi_cls_vit_dynamic_size_resamples_pos_embed_rows():
    model = create_model("vit_cifar", num_cls_tokens=2, dynamic_img_size=True).eval()
    assert model.pos_embed.shape == (1, 66, model.embed_dim)
    assert model(torch.randn(1, 3, 48, 32)).shape == (1, 10)


def test_scripting_and_export_with_options():
    model = create_model("eit_micro", num_cls_tokens=2, q_rank=16, v_rank=20).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x))


# --- checkpoints rebuild the same model -------------------------------------------------------------------

OPTIONS = dict(num_cls_tokens=2, q_rank=16, v_rank=20, init="timm", attn_init="default")


def test_config_round_trips_through_json():
    cfg = eit_fast.get_config("eit_micro", **OPTIONS)
    assert eit_fast.EITConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_evaluate_rebuilds_options_from_the_file(tmp_path, fmt):
    model = create_model("eit_micro", **OPTIONS).eval()
    path = tmp_path / f"m.{fmt}"
    if fmt == "pt":
        save_checkpoint(path, model, config={"model_config": model.cfg.to_dict()})
    else:
        save_safetensors(path, model, {"config": json.dumps(model.cfg.to_dict())})
    rebuilt, _, _ = load_model_for_eval(str(path), None, False)
    assert rebuilt.cfg == model.cfg
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x), model(x), rtol=0, atol=0)


def test_load_checkpoint_into_a_model_with_other_options_refuses(tmp_path):
    model = create_model("eit_micro", num_cls_tokens=2)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, config={"model_config": model.cfg.to_dict()})
    with pytest.raises(Exception, match="cls_token"):
        eit_fast.load_checkpoint(create_model("eit_micro"), path)
    eit_fast.load_checkpoint(create_model("eit_micro", num_cls_tokens=2), path)


# --- fused paths: what they do not support ----------------------------------------------------------------

def test_the_mixer_judges_options_from_the_blocks():
    """fused_block.applies_to is the one judge: it reads each block's options, not the model's config."""
    from eit_fast.modules import fused_block
    assert fused_block.applies_to(create_model("eit_micro")).applies
    assert fused_block.applies_to(create_model("eit_micro", attn_init="impulse", init="torch")).applies
    v = fused_block.applies_to(create_model("eit_micro", num_cls_tokens=2, k_rank=8))
    assert v.unsupported and "num_cls_tokens=2" in v.reason and "low-rank q/k/v" in v.reason
    # a rank at or above every layer's width changes nothing, so nothing is unsupported
    assert fused_block.applies_to(create_model("eit_micro", q_rank=96)).applies


def test_auto_leaves_the_block_mixer_out_for_unsupported_options():
    model = create_model("eit_micro", num_cls_tokens=2, impl="auto")
    sel = eit_fast.info()["last_selection"]
    assert "block_mixer" not in sel["fused"] and "num_cls_tokens=2" in sel["reason"], sel
    assert all(type(b).__name__ == "Block" for b in model.blocks)


def test_fused_refuses_unsupported_options_even_where_another_path_could_run():
    """impl="fused" means every path that has parts to replace is fused: the stem alone is not enough."""
    with pytest.raises(ImplError, match=r"fused block_mixer does not support .*num_cls_tokens=2"):
        create_model("eit_micro", num_cls_tokens=2, impl="fused")
    with pytest.raises(ImplError, match="low-rank q/k/v"):
        create_model("eit_micro", q_rank=8, impl="fused")
    model = eit_fast.patch(create_model("eit_micro", num_cls_tokens=2))
    assert not any(type(b).__name__.endswith("FusedBlock") for b in model.blocks)
    assert "block_mixer: does not support" in eit_fast.info()["last_selection"]["reason"]


# --- impulse init -----------------------------------------------------------------------------------------

def impulse_hits(model):
    """Per attention layer: the share of grid queries (with an in-grid target) whose attention argmax on the
    pseudo-input lands on the head's shifted token, over all heads."""
    out = []
    for blk, shifts in zip(model.blocks, model.impulse_shifts):
        if not blk.attn_dim:
            continue
        P = pseudo_input(model.grid_size, blk.attn_dim).to(torch.float32)
        att = blk.attn.attention_map(P[None])[0]           # (heads, N, N)
        hits = total = 0
        for h, shift in enumerate(shifts):
            t = shift_targets(model.grid_size, shift)
            rows = (t >= 0).nonzero().squeeze(1)
            hits += (att[h, rows].argmax(-1) == t[rows]).sum().item()
            total += len(rows)
        out.append(hits / total)
    return out


def test_impulse_heads_attend_to_their_shift():
    vit = create_model("vit_cifar", attn_init="impulse")  # head size 25 in every layer
    assert all(hit >= 0.99 for hit in impulse_hits(vit)), impulse_hits(vit)
    eit = create_model("eit_cifar", attn_init="impulse")  # head sizes 5, 10, 15, 20, 25
    hits = impulse_hits(eit)
    assert all(hit >= 0.99 for hit in hits[1:]), hits
    assert hits[0] >= 0.5, hits  # a 5-channel head cannot fit every impulse (eit_fast/models/impulse.py)


def test_impulse_is_deterministic_given_the_seed_and_differs_from_default():
    torch.manual_seed(3)
    a = create_model("eit_micro", attn_init="impulse")
    torch.manual_seed(3)
    b = create_model("eit_micro", attn_init="impulse")
    torch.manual_seed(3)
    plain = create_model("eit_micro")
    assert a.impulse_shifts == b.impulse_shifts
    assert all(all(-1 <= dy <= 1 and -1 <= dx <= 1 for dy, dx in layer) for layer in a.impulse_shifts)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)
    a_w = a.blocks[1].attn.qkv.weight
    assert not torch.equal(a_w[:48], plain.blocks[1].attn.qkv.weight[:48])
    assert torch.count_nonzero(a.blocks[1].attn.qkv.bias[:96]) == 0  # q and k biases zeroed


def test_impulse_window_bounds_shifts_and_works_with_low_rank_v():
    torch.manual_seed(0)
    model = create_model("vit_cifar", attn_init="impulse", impulse_window=5, v_rank=32, depth=2)
    assert max(max(abs(dy), abs(dx)) for layer in model.impulse_shifts for dy, dx in layer) <= 2
    assert all(hit >= 0.99 for hit in impulse_hits(model))


# --- init rules (issue 11) --------------------------------------------------------------------------------

def linear_weights(model):
    return torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear)])


def close(value, want, rel):
    return abs(value - want) <= rel * want


def test_paper_configs_default_to_the_authors_init():
    assert all(cfg.init == "authors" and cfg.attn_init == "default" for cfg in eit_fast.CONFIGS.values())


def test_authors_init_statistics():
    model = create_model("eit_cifar")
    assert close(linear_weights(model).std().item(), 0.01, 0.02)
    conv = model.blocks[0].eit_t.conv1.weight  # 200 channels
    assert close(conv.std().item(), math.sqrt(2 / (9 * 200)), 0.06)
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m.bias is not None)


def test_timm_init_statistics():
    model = create_model("eit_cifar", init="timm")
    assert close(linear_weights(model).std().item(), 0.02, 0.02)
    conv = model.blocks[0].eit_t.conv1.weight
    assert close(conv.std().item(), math.sqrt(2 / 9), 0.06)  # group-aware fan_out = 9
    stem = model.patch_embed.eit_p.conv.weight               # 250 x 3 x 3 x 3, fan_out 9 * 250
    assert close(stem.std().item(), math.sqrt(2 / (9 * 250)), 0.06)
    model.reset_classifier(100)
    assert close(model.head.weight.std().item(), 0.02, 0.05)


def test_torch_init_statistics():
    model = create_model("eit_cifar", init="torch")
    fc1 = model.blocks[0].mlp.fc1  # fan_in 250: uniform in +-1/sqrt(250)
    bound = 1 / math.sqrt(250)
    assert fc1.weight.abs().max().item() <= bound and close(fc1.weight.std().item(), bound / math.sqrt(3), 0.02)
    assert fc1.bias.abs().max().item() <= bound and torch.count_nonzero(fc1.bias) == fc1.bias.numel()
    conv = model.blocks[0].eit_t.conv1.weight  # fan_in 9 (groups counted): uniform in +-1/3
    assert conv.abs().max().item() <= 1 / 3 and close(conv.std().item(), 1 / 3 / math.sqrt(3), 0.06)


@pytest.mark.parametrize("kw, word", [
    (dict(num_cls_tokens=0), "num_cls_tokens"), (dict(q_rank=0), "q_rank"), (dict(v_rank=2.5), "v_rank"),
    (dict(init="xavier"), "init"), (dict(attn_init="mimetic"), "attn_init"), (dict(impulse_window=2),
                                                                             "impulse_window"),
    (dict(attn_init="impulse", k_rank=8), "k_rank")])
def test_bad_options_are_refused(kw, word):
    with pytest.raises(ConfigError, match=word):
        create_model("eit_micro", **kw)


def test_timm_create_model_carries_the_options():
    timm = pytest.importorskip("timm")
    model = timm.create_model("eit_micro", num_cls_tokens=2, q_rank=16, init="timm").eval()
    assert (model.cfg.num_cls_tokens, model.cfg.q_rank, model.cfg.init) == (2, 16, "timm")
    assert (model.num_prefix_tokens, model.num_features, model.head_hidden_size) == (2, 96, 192)
    x = torch.randn(2, 3, 32, 32)
    feats = timm.create_model("eit_micro", num_cls_tokens=2, features_only=True, out_indices=(1, 3))(x)
    assert [f.shape for f in feats] == [(2, 96, 8, 8)] * 2
    pooled = timm.create_model("eit_micro", num_cls_tokens=2, num_classes=0)(x)
    assert pooled.shape == (2, 192)
