"""Model configurations: the EIT hyper-parameters, their validation, and the named configs.

The arithmetic here (token grid, per-layer attention/conv split) is the single source of truth for the
model, the FLOP counter and the summary.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union


class ConfigError(ValueError):
    """A model configuration (or override) that cannot describe a valid model."""


class UnknownOptionError(ConfigError, TypeError):
    """An option that is no field of EITConfig: a TypeError, as for any unknown keyword (Python's and timm's
    convention), and still a ConfigError for callers that report configuration problems."""


GLOBAL_POOLS = ("token", "avg", "")
INITS = ("authors", "timm", "torch")
ATTN_INITS = ("default", "impulse")


@dataclass(frozen=True)
class EITConfig:
    # An int (square) or an (H, W) pair; a square pair is stored as an int, so square configs read as before.
    img_size: Union[int, tuple[int, int]] = 224
    in_chans: int = 3
    num_classes: int = 1000   # 0: no head, the model returns pooled features (timm's convention)
    embed_dim: int = 250
    depth: int = 5
    num_heads: int = 10
    mlp_ratio: float = 4.0
    # Stem. "eit": Conv2d(k, stride s, padding k//2) then MaxPool2d(p) (EIT-P).
    #       "patch": ViT patchify, Conv2d(patch_size, stride patch_size).
    stem: str = "eit"
    patch_kernel: int = 16
    patch_stride: int = 4
    pool: int = 3
    patch_size: int = 16
    # True: EIT-T blocks (decreasing depthwise-conv share). False: plain ViT blocks.
    conv_split: bool = True
    pos_embed: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # Width of the authors' optional Tanh "pre_logits" layer; None leaves it out (their ImageNet runs).
    pre_logits: Optional[int] = None
    # What the head reads: "token" (the CLS token, the authors'), "avg" (mean of the patch tokens) or ""
    # (no pooling: the head runs on every token).
    global_pool: str = "token"
    # True: any input size at run time (a learned positional embedding is interpolated, as timm does).
    dynamic_img_size: bool = False
    # --- options beyond the paper (docs/design.md section 1.6; the defaults are the paper's model) ---
    # CLS tokens through every block; with global_pool="token" the head reads their concatenation (n*D).
    num_cls_tokens: int = 1
    # Rank of a low-rank q / k / v projection (Linear(a, r, bias=False) then Linear(r, a)); None: full rank.
    # A layer whose attention width a <= r keeps its full projection (a factorisation would not lower its rank).
    q_rank: Optional[int] = None
    k_rank: Optional[int] = None
    v_rank: Optional[int] = None
    # Weight init: "authors" (their code: Linear trunc-normal 0.01, conv kaiming fan_out ignoring groups),
    # "timm" (Linear trunc-normal 0.02, conv normal with fan_out = k*k*out/groups), "torch" (module defaults).
    init: str = "authors"
    # "impulse": q and k rows of every qkv fitted so each head attends to a random shift in an
    # impulse_window x impulse_window neighbourhood (eit_fast.models.impulse); "default": the `init` rule.
    attn_init: str = "default"
    impulse_window: int = 3

    def __post_init__(self):
        object.__setattr__(self, "img_size", _image_size(self.img_size))
        for name in ("in_chans", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.num_classes) or self.num_classes < 0:
            raise ConfigError(f"num_classes must be a non-negative integer (0: no head), got {self.num_classes!r}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        if not isinstance(self.dynamic_img_size, bool):
            raise ConfigError(f"dynamic_img_size must be True or False, got {self.dynamic_img_size!r}")
        self._check_options()
        if self.stem not in ("eit", "patch"):
            raise ConfigError(f"stem must be 'eit' or 'patch', got {self.stem!r}")
        for name in ("patch_kernel", "patch_stride", "pool", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} does not divide embed_dim={self.embed_dim}: the last block gives "
                f"all {self.embed_dim} channels to attention, so the head size would not be an integer")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if self.pre_logits is not None and (not isinstance(self.pre_logits, int) or self.pre_logits < 1):
            raise ConfigError(f"pre_logits must be None or a positive integer, got {self.pre_logits!r}")
        if self.stem == "patch" and any(side % self.patch_size for side in self.img_hw):
            raise ConfigError(f"patch_size={self.patch_size} does not divide img_size={self.img_size}")
        if self.stem == "eit":
            conv = self.conv_hw
            if min(conv) < 1:
                raise ConfigError(
                    f"patch_kernel={self.patch_kernel}, patch_stride={self.patch_stride} give no conv output "
                    f"at img_size={self.img_size}")
            if min(conv) < self.pool:
                raise ConfigError(f"pool={self.pool} is larger than the {conv[0]}x{conv[1]} conv output at "
                                  f"img_size={self.img_size}")

    def _check_options(self):
        if not _is_int(self.num_cls_tokens) or self.num_cls_tokens < 1:
            raise ConfigError(f"num_cls_tokens must be a positive integer, got {self.num_cls_tokens!r}")
        for name in ("q_rank", "k_rank", "v_rank"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(f"{name} must be None (full rank) or a positive integer, got {value!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.attn_init not in ATTN_INITS:
            raise ConfigError(f"attn_init must be one of {ATTN_INITS}, got {self.attn_init!r}")
        if not _is_int(self.impulse_window) or self.impulse_window < 1 or self.impulse_window % 2 == 0:
            raise ConfigError(f"impulse_window must be a positive odd integer, got {self.impulse_window!r}")
        if self.attn_init == "impulse" and (self.q_rank is not None or self.k_rank is not None):
            raise ConfigError("attn_init='impulse' writes full-rank q and k weights; it cannot be combined with "
                              "q_rank or k_rank (v_rank is fine)")

    def rank(self, part: str, layer: int) -> Optional[int]:
        """The rank of projection `part` ("q", "k" or "v") in block `layer`, or None when it is full."""
        r = getattr(self, f"{part}_rank")
        a = self.split(layer)[0]
        return r if r is not None and r < a else None

    # --- token arithmetic -------------------------------------------------------------------------------
    @property
    def img_hw(self) -> tuple[int, int]:
        """(H, W) of the input image."""
        s = self.img_size
        return (s, s) if isinstance(s, int) else s

    @property
    def conv_hw(self) -> tuple[int, int]:
        """(H, W) of the stem conv's output (EIT stem only)."""
        k = self.patch_kernel
        return tuple((side + 2 * (k // 2) - k) // self.patch_stride + 1 for side in self.img_hw)

    @property
    def grid_hw(self) -> tuple[int, int]:
        """(Hp, Wp) of the patch-token grid."""
        if self.stem == "patch":
            return tuple(side // self.patch_size for side in self.img_hw)
        return tuple(side // self.pool for side in self.conv_hw)  # MaxPool2d(p, stride p), no padding, floor

    @property
    def reduction(self) -> int:
        """Pixels between neighbouring tokens: conv stride x pool, or the patch size."""
        return self.patch_size if self.stem == "patch" else self.patch_stride * self.pool

    @property
    def conv_grid(self) -> int:
        """Side of the stem conv's output, for square images (EIT stem only)."""
        return self._square(self.conv_hw, "conv_grid", "conv_hw")

    @property
    def grid_size(self) -> int:
        """Side of the square patch-token grid, for square images."""
        return self._square(self.grid_hw, "grid_size", "grid_hw")

    def _square(self, hw: tuple[int, int], name: str, pair: str) -> int:
        if hw[0] != hw[1]:
            raise ConfigError(f"{name} is the side of a square grid, but img_size={self.img_size} is not square; "
                              f"use {pair}")
        return hw[0]

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_hw
        return gh * gw

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by attention: the patch tokens plus the CLS token(s)."""
        return self.num_patches + self.num_cls_tokens

    @property
    def pooled_dim(self) -> int:
        """Width of what global pooling gives the head: the concatenated CLS tokens for "token", else D."""
        return self.embed_dim * self.num_cls_tokens if self.global_pool == "token" else self.embed_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def split(self, layer: int) -> tuple[int, int]:
        """(attention channels, conv channels) of block `layer`: the EIT "decreasing convolution"."""
        if not 0 <= layer < self.depth:
            raise IndexError(f"layer {layer} out of range for depth {self.depth}")
        D, H = self.embed_dim, self.num_heads
        if not self.conv_split or layer == self.depth - 1:
            return D, 0
        a = int((D // H) * (layer + 1) / self.depth) * H
        return a, D - a

    @property
    def splits(self) -> list[tuple[int, int]]:
        return [self.split(i) for i in range(self.depth)]

    def replace(self, **overrides) -> "EITConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UnknownOptionError(f"unknown config option(s) {unknown}; valid options: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _image_size(value) -> Union[int, tuple[int, int]]:
    """An int, or an (H, W) pair (a list from JSON metadata too); a square pair becomes an int."""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) and v >= 1 for v in value):
        h, w = value
        return h if h == w else (h, w)
    if _is_int(value) and value >= 1:
        return value
    raise ConfigError(f"img_size must be a positive integer or an (H, W) pair of them, got {value!r}")


# --- named configs ---------------------------------------------------------------------------------------

_EIT_224 = dict(img_size=224, stem="eit", patch_kernel=16, patch_stride=4, pool=3)
_VIT_224 = dict(img_size=224, stem="patch", patch_size=16, conv_split=False, pos_embed=True)

CONFIGS: dict[str, EITConfig] = {
    # EIT16/4/3 models of the paper (ImageNet-1K, 224 px).
    "eit_mini": EITConfig(embed_dim=250, depth=5, num_heads=10, **_EIT_224),
    "eit_tiny": EITConfig(embed_dim=330, depth=8, num_heads=10, **_EIT_224),
    "eit_base": EITConfig(embed_dim=400, depth=10, num_heads=16, **_EIT_224),
    "eit_large": EITConfig(embed_dim=464, depth=12, num_heads=16, **_EIT_224),
    # The authors' class defaults, their small-image setting: 32 px, 3/1/4 -> 8x8 tokens.
    "eit_cifar": EITConfig(img_size=32, num_classes=10, embed_dim=250, depth=5, num_heads=10, stem="eit",
                           patch_kernel=3, patch_stride=1, pool=4,
                           drop_rate=0.2, attn_drop_rate=0.15, drop_path_rate=0.2),
    # Not from the paper: a small EIT for smoke runs (the training command's default), same 32 px stem.
    "eit_micro": EITConfig(img_size=32, num_classes=10, embed_dim=96, depth=4, num_heads=4, stem="eit",
                           patch_kernel=3, patch_stride=1, pool=4, drop_path_rate=0.05),
    # Plain ViT twins for the paper's comparison: same width, depth and heads.
    "vit_mini": EITConfig(embed_dim=250, depth=5, num_heads=10, **_VIT_224),
    "vit_tiny": EITConfig(embed_dim=330, depth=8, num_heads=10, **_VIT_224),
    "vit_base": EITConfig(embed_dim=400, depth=10, num_heads=16, **_VIT_224),
    "vit_large": EITConfig(embed_dim=464, depth=12, num_heads=16, **_VIT_224),
    "vit_cifar": EITConfig(img_size=32, num_classes=10, embed_dim=250, depth=5, num_heads=10, stem="patch",
                           patch_size=4, conv_split=False, pos_embed=True,
                           drop_rate=0.2, attn_drop_rate=0.15, drop_path_rate=0.2),
}


def list_models() -> list[str]:
    return sorted(CONFIGS)


def get_config(name: str, **overrides) -> EITConfig:
    try:
        base = CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return base.replace(**overrides)


# --- timm's pretrained_cfg ---------------------------------------------------------------------------------

PAPER_ID = "arXiv:2203.07116"
PAPER_NAME = "EIT: Efficiently Lead Inductive Biases to ViT"
AUTHORS_CODE = "https://github.com/MrHaiPi/EIT"


def eval_crop_pct(side: int) -> float:
    """The evaluation centre crop: DeiT's 0.875 from 128 px up; small images (CIFAR) are not cropped."""
    return 0.875 if side >= 128 else 1.0


def pretrained_cfg(cfg: EITConfig, name: Optional[str] = None) -> dict:
    """timm's pretrained_cfg (data config and model facts) for a model of `cfg`. There are no hub weights.

    Evaluation transform as the authors' (DeiT's): bicubic, ImageNet mean/std, crop 0.875 at 224 px; the
    32 px configs take images whole (crop 1.0), as eit_fast's trainer does.
    """
    H, W = cfg.img_hw
    min_side = cfg.patch_size if cfg.stem == "patch" else \
        (cfg.pool - 1) * cfg.patch_stride + cfg.patch_kernel - 2 * (cfg.patch_kernel // 2)
    twin = cfg.stem == "patch" and not cfg.conv_split
    notes = ("No hub weights: pretrained=True has nothing to download. The authors' ImageNet checkpoints "
             f"({AUTHORS_CODE}, eit_mini/tiny/base/large) load with eit_fast.load_checkpoint(model, path) or "
             "eit_fast.create_model(name, checkpoint_path=path).",
             "The license describes eit_fast's code; the authors' repository states none for its weights.")
    if twin:
        notes += ("A plain ViT twin (same width, depth, heads) for the EIT paper's comparison; not a "
                  "published model.",)
    return dict(
        architecture=name,
        input_size=(cfg.in_chans, H, W),
        min_input_size=(cfg.in_chans, min_side, min_side),
        fixed_input_size=not cfg.dynamic_img_size,
        interpolation="bicubic",
        crop_pct=eval_crop_pct(max(H, W)),
        crop_mode="center",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        num_classes=cfg.num_classes,
        first_conv="patch_embed.proj" if cfg.stem == "patch" else "patch_embed.eit_p.conv",
        classifier="head",
        license="mit",
        description=("ViT twin of EIT" if twin else "EIT") + f" {cfg.embed_dim}/{cfg.depth}/{cfg.num_heads}",
        origin_url=AUTHORS_CODE,
        paper_name=PAPER_NAME,
        paper_ids=PAPER_ID,
        notes=notes,
    )
