"""`python -m eit_fast.summary [NAME...]`: parameters, tokens, per-layer split and MACs of named models."""
from __future__ import annotations

import argparse
import sys

from .configs import ConfigError, get_config, list_models
from .flops import count_macs, count_params
from .models import EIT


def summarize(name: str) -> str:
    cfg = get_config(name)
    import torch
    with torch.device("meta"):
        params = count_params(EIT(cfg))
    macs = count_macs(cfg)
    g = cfg.grid_size
    stem = (f"EIT-P conv {cfg.patch_kernel}/{cfg.patch_stride} + max-pool {cfg.pool}: "
            f"{cfg.img_size} -> {cfg.conv_grid}x{cfg.conv_grid} -> {g}x{g}" if cfg.stem == "eit"
            else f"patchify {cfg.patch_size}x{cfg.patch_size}: {cfg.img_size} -> {g}x{g}")
    lines = [
        f"== {name} ==",
        f"  params            {params:,}",
        f"  image             {cfg.img_size}x{cfg.img_size}x{cfg.in_chans}, {cfg.num_classes} classes",
        f"  stem              {stem}",
        f"  tokens            {cfg.num_tokens} ({cfg.num_patches} patches + "
        f"{'CLS' if cfg.num_cls_tokens == 1 else f'{cfg.num_cls_tokens} CLS'})",
        f"  width/depth/heads {cfg.embed_dim} / {cfg.depth} / {cfg.num_heads}",
        "  per-layer (attention, conv) channels and head size:",
    ]
    for i, (a, c) in enumerate(cfg.splits):
        lines.append(f"    layer {i:2d}: ({a:3d}, {c:3d})  head size {a // cfg.num_heads}")
    lines += [
        f"  MACs, authors' convention (no attention matmuls) {macs.authors / 1e9:6.2f} G  ({macs.authors:,})",
        f"  MACs, with attention matmuls                     {macs.total / 1e9:6.2f} G  ({macs.total:,})",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eit_fast.summary", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"model names (default: all): {', '.join(list_models())}")
    args = parser.parse_args(argv)
    names = args.names or list_models()
    for name in names:
        try:
            print(summarize(name))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
