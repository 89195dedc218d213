import json

import pytest

import eit_fast
from eit_fast import ConfigError, get_config

# docs/design.md section 1.2: per-layer (attention, conv) channel splits of the released models.
SPLITS = {
    "eit_mini": [(50, 200), (100, 150), (150, 100), (200, 50), (250, 0)],
    "eit_tiny": [(40, 290), (80, 250), (120, 210), (160, 170), (200, 130), (240, 90), (280, 50), (330, 0)],
    "eit_base": [(32, 368), (80, 320), (112, 288), (160, 240), (192, 208), (240, 160), (272, 128), (320, 80),
                 (352, 48), (400, 0)],
    "eit_large": [(32, 432), (64, 400), (112, 352), (144, 320), (192, 272), (224, 240), (256, 208), (304, 160),
                  (336, 128), (384, 80), (416, 48), (464, 0)],
}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_released_splits(name):
    assert get_config(name).splits == SPLITS[name]


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_released_token_arithmetic(name):
    cfg = get_config(name)
    assert (cfg.conv_grid, cfg.grid_size, cfg.num_tokens) == (57, 19, 362)


def test_cifar_configs_share_the_8x8_grid():
    eit, vit = get_config("eit_cifar"), get_config("vit_cifar")
    assert (eit.conv_grid, eit.grid_size, eit.num_tokens) == (32, 8, 65)
    assert (vit.grid_size, vit.num_tokens) == (8, 65)
    assert (eit.drop_rate, eit.attn_drop_rate, eit.drop_path_rate) == (0.2, 0.15, 0.2)


@pytest.mark.parametrize("size", ["mini", "tiny", "base", "large", "cifar"])
def test_vit_twins_match_width_depth_heads(size):
    eit, vit = get_config(f"eit_{size}"), get_config(f"vit_{size}")
    assert (vit.embed_dim, vit.depth, vit.num_heads, vit.img_size) == \
           (eit.embed_dim, eit.depth, eit.num_heads, eit.img_size)
    assert vit.pos_embed and not vit.conv_split
    assert all(c == 0 for _, c in vit.splits)
    assert vit.patch_size == (4 if size == "cifar" else 16)


def test_conv_only_layer_when_head_width_is_below_depth():
    cfg = get_config("eit_cifar", embed_dim=40, num_heads=10)  # D//H = 4 < depth 5
    assert cfg.splits[0] == (0, 40)
    assert cfg.splits[-1] == (40, 0)


def test_list_models():
    assert set(eit_fast.list_models()) == {f"{p}_{s}" for p in ("eit", "vit")
                                           for s in ("mini", "tiny", "base", "large", "cifar")} | {"eit_micro"}


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=7), "num_heads=7 does not divide embed_dim=250"),
    (dict(embed_dim=0), "embed_dim must be a positive integer"),
    (dict(depth=2.5), "depth must be a positive integer"),
    (dict(img_size=4), "pool=3 is larger than the 2x2 conv output at img_size=4"),
    (dict(drop_rate=1.0), "drop_rate must be in [0, 1)"),
    (dict(stem="pyramid"), "stem must be 'eit' or 'patch'"),
    (dict(stem="patch", patch_size=15), "patch_size=15 does not divide img_size=224"),
    (dict(pre_logits=0), "pre_logits must be None or a positive integer"),
    (dict(num_classes=-1), "num_classes must be a non-negative integer (0: no head)"),
    (dict(global_pool="max"), "global_pool must be one of ('token', 'avg', ''), got 'max'"),
    (dict(dynamic_img_size=1), "dynamic_img_size must be True or False"),
    (dict(img_size=(224, 0)), "img_size must be a positive integer or an (H, W) pair of them, got (224, 0)"),
    (dict(img_size=(224, 224, 3)), "img_size must be a positive integer or an (H, W) pair"),
    (dict(img_size=(4, 224)), "pool=3 is larger than the 2x57 conv output at img_size=(4, 224)"),
    (dict(stem="patch", img_size=(224, 200), patch_size=16), "patch_size=16 does not divide img_size=(224, 200)"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError) as e:
        eit_fast.create_model("eit_mini", **overrides)
    assert message in str(e.value)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match=r"unknown model 'eit_huge'; available: eit_base, eit_cifar"):
        eit_fast.create_model("eit_huge")


@pytest.mark.parametrize("overrides", [dict(heads=10), dict(features=1, num_classes=3)])
def test_unknown_option_is_a_type_error_naming_it(overrides):
    with pytest.raises(TypeError) as e:
        eit_fast.create_model("eit_mini", **overrides)
    assert f"unknown config option(s) {sorted(set(overrides) - {'num_classes'})}" in str(e.value)
    assert isinstance(e.value, ConfigError)  # the CLIs report it as a configuration error


def test_image_size_pairs():
    square = get_config("eit_mini", img_size=(224, 224))
    assert square.img_size == 224 and square == get_config("eit_mini")  # stored as before
    wide = get_config("eit_mini", img_size=[160, 256])  # a list, as JSON metadata gives it back
    assert wide.img_size == (160, 256) and wide.img_hw == (160, 256)
    assert wide.conv_hw == (41, 65) and wide.grid_hw == (13, 21) and wide.num_tokens == 13 * 21 + 1
    assert get_config("vit_mini", img_size=(160, 256)).grid_hw == (10, 16)
    assert eit_fast.EITConfig(**json.loads(json.dumps(wide.to_dict()))) == wide
    with pytest.raises(ConfigError, match=r"grid_size is the side of a square grid, .* use grid_hw"):
        wide.grid_size


def test_pretrained_cfg_describes_the_model():
    from eit_fast.configs import pretrained_cfg
    micro = pretrained_cfg(get_config("eit_micro"), "eit_micro")
    assert micro["input_size"] == (3, 32, 32) and micro["crop_pct"] == 1.0 and micro["num_classes"] == 10
    assert micro["min_input_size"] == (3, 4, 4)  # conv 3/1 keeps the size, pool 4 needs 4 px
    mini = pretrained_cfg(get_config("eit_mini"), "eit_mini")
    assert (mini["input_size"], mini["crop_pct"], mini["interpolation"]) == ((3, 224, 224), 0.875, "bicubic")
    assert mini["first_conv"] == "patch_embed.eit_p.conv" and mini["classifier"] == "head"
    assert mini["paper_ids"] == "arXiv:2203.07116" and mini["fixed_input_size"]
    assert mini["min_input_size"] == (3, 8, 8)  # conv 16/4 with padding 8 gives 3 px for pool 3 from 8 px
    assert any("No hub weights" in n for n in mini["notes"])
    assert pretrained_cfg(get_config("vit_mini"))["first_conv"] == "patch_embed.proj"
    assert not pretrained_cfg(get_config("eit_mini", dynamic_img_size=True))["fixed_input_size"]


@pytest.mark.parametrize("side", [32, 96, 127, 128, 224])
def test_the_evaluation_transform_crops_as_pretrained_cfg_says(side):
    """One rule: the data pipeline's evaluation crop and the crop_pct that exports and timm users read."""
    pytest.importorskip("torchvision")
    from eit_fast.configs import pretrained_cfg
    from eit_fast.data.loader import worker_transforms
    resize = worker_transforms(side, False, None).transforms[0]
    crop_pct = pretrained_cfg(get_config("eit_micro", img_size=side))["crop_pct"]
    assert resize.size == int(side / crop_pct) and crop_pct == (0.875 if side >= 128 else 1.0)
