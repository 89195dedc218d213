"""Model configurations: the EIT hyper-parameters, their validation, and the named configs.

The arithmetic here (token grid, per-layer attention/conv split) is the single source of truth for the
model, the FLOP counter and the summary.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


class ConfigError(ValueError):
    """A model configuration (or override) that cannot describe a valid model."""


@dataclass(frozen=True)
class EITConfig:
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
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

    def __post_init__(self):
        for name in ("img_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
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
        if self.stem == "patch" and self.img_size % self.patch_size:
            raise ConfigError(f"patch_size={self.patch_size} does not divide img_size={self.img_size}")
        if self.stem == "eit":
            conv = self.conv_grid
            if conv < 1:
                raise ConfigError(
                    f"patch_kernel={self.patch_kernel}, patch_stride={self.patch_stride} give no conv output "
                    f"at img_size={self.img_size}")
            if conv < self.pool:
                raise ConfigError(
                    f"pool={self.pool} is larger than the {conv}x{conv} conv output at img_size={self.img_size}")

    # --- token arithmetic -------------------------------------------------------------------------------
    @property
    def conv_grid(self) -> int:
        """Side of the stem conv's output (EIT stem only)."""
        k = self.patch_kernel
        return (self.img_size + 2 * (k // 2) - k) // self.patch_stride + 1

    @property
    def grid_size(self) -> int:
        """Side of the square patch-token grid."""
        if self.stem == "patch":
            return self.img_size // self.patch_size
        return self.conv_grid // self.pool  # MaxPool2d(p, stride p), no padding, floor mode

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by attention: the patch tokens plus the CLS token."""
        return self.num_patches + 1

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
            raise ConfigError(f"unknown config option(s) {unknown}; valid options: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
