"""How far heads attend, how diverse they are, and how much high-frequency content each layer keeps.

The EIT paper explains its gains with these three analyses, but its exact definitions are not public: the
measures below are our reconstructions.

- Mean attention distance, in pixels, per layer and head: for a query patch token i, sum_j A[i, j] |p_i - p_j|
  over the patch keys j, where A is the head's softmax attention (before dropout) restricted to the patch keys
  and renormalised (CLS tokens have no position: left out as queries and keys), p the token's (row, col) on
  the token grid and |.| the Euclidean distance; averaged over the queries and the images, then times the
  stem's token stride in pixels (EIT-P: conv stride x pool; ViT: patch size; `EITConfig.reduction`).
  Blocks without attention channels have no heads and report none.
- Head diversity, per layer: the standard deviation (population) of its heads' mean distances, with their
  min and max.
- High-frequency share, per block output: every channel of the patch tokens as an Hp x Wp map, the energy
  |FFT2|^2 summed over channels and images; the share of it at radial frequencies sqrt(fy^2 + fx^2) above
  `cutoff` cycles per token (default 0.25, half the Nyquist frequency 0.5), out of all of it (DC included).
  A constant map scores 0, a checkerboard 1.

Attention maps come from forward pre-hooks on the attention modules, which recompute softmax(q k^T) from the
module's own input and weights (Attention.attention_map): the forward pass itself is untouched.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .models.eit import EIT, Attention

DEFINITIONS = {
    "mean_distance_px": "per head: sum_j A[i,j] * |p_i - p_j| over patch keys (attention renormalised over "
                        "them), averaged over patch queries and images, times the token stride in pixels",
    "diversity_std_px": "population std of a layer's head distances",
    "high_freq_share": "share of |FFT2|^2 energy of the block's output token maps at radial frequency above "
                       "the cutoff (cycles per token), DC included in the total",
    "note": "our reconstructions: the EIT paper's exact definitions are not public",
}


def grid_distances(grid: tuple[int, int], device=None) -> torch.Tensor:
    """(N, N) Euclidean distances between the tokens of an Hp x Wp grid, in tokens."""
    ys, xs = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                            indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1).double()
    return torch.cdist(pos, pos)


def attention_distance(attn: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """(B, heads) mean attention distance in tokens, from attention probabilities (B, heads, N, N)."""
    n = num_prefix_tokens
    if attn.shape[-1] != n + grid[0] * grid[1]:
        raise ValueError(f"attention over {attn.shape[-1]} tokens does not match a {grid[0]}x{grid[1]} grid "
                         f"with {n} prefix tokens")
    a = attn[..., n:, n:].double()
    a = a / a.sum(dim=-1, keepdim=True)
    return (a * grid_distances(grid, attn.device)).sum(-1).mean(-1)


def frequency_radius(grid: tuple[int, int], device=None) -> torch.Tensor:
    """(Hp, Wp) radial frequency of each FFT2 bin, in cycles per token (0 at DC, up to 0.5 sqrt 2)."""
    fy = torch.fft.fftfreq(grid[0], device=device).double()
    fx = torch.fft.fftfreq(grid[1], device=device).double()
    return (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()


def frequency_energy(maps: torch.Tensor, cutoff: float) -> tuple[float, float]:
    """(high-frequency energy, total energy) of maps (..., Hp, Wp), summed over all leading dimensions."""
    energy = torch.fft.fft2(maps.double()).abs() ** 2
    energy = energy.reshape(-1, *maps.shape[-2:]).sum(0)
    high = frequency_radius(maps.shape[-2:], maps.device) > cutoff
    return energy[high].sum().item(), energy.sum().item()


def high_frequency_share(maps: torch.Tensor, cutoff: float = 0.25) -> float:
    """The share of the energy of maps (..., Hp, Wp) above `cutoff` cycles per token (0 for all-zero maps)."""
    high, total = frequency_energy(maps, cutoff)
    return high / total if total > 0 else 0.0


@torch.no_grad()
def analyze(model: EIT, batches: Iterable[torch.Tensor], cutoff: float = 0.25) -> dict:
    """The three measures for `model` over image batches (B, C, H, W); a JSON-ready dict."""
    if not 0 < cutoff < 0.5 * math.sqrt(2):
        raise ValueError(f"cutoff must be in (0, {0.5 * math.sqrt(2):.3f}) cycles per token, got {cutoff}")
    cfg = model.cfg
    depth = len(model.blocks)
    dist_sum = [None] * depth
    high, total = [0.0] * depth, [0.0] * depth
    state = {}
    hooks = []

    def attn_hook(i):
        def hook(module: Attention, args):
            d = attention_distance(module.attention_map(args[0]), state["grid"], model.num_prefix_tokens)
            dist_sum[i] = d.sum(0) if dist_sum[i] is None else dist_sum[i] + d.sum(0)
        return hook

    def block_hook(i):
        def hook(module, args, out):
            grid, n = state["grid"], model.num_prefix_tokens
            maps = out[:, n:].transpose(1, 2).reshape(out.shape[0], out.shape[2], grid[0], grid[1])
            h, t = frequency_energy(maps, cutoff)
            high[i] += h
            total[i] += t
        return hook

    for i, blk in enumerate(model.blocks):
        if getattr(blk, "attn_dim", 0):
            hooks.append(blk.attn.register_forward_pre_hook(attn_hook(i)))
        hooks.append(blk.register_forward_hook(block_hook(i)))
    was_training = model.training
    model.eval()
    images = 0
    try:
        for x in batches:
            state["grid"] = model.patch_embed.grid(x.shape[2], x.shape[3])
            model(x)
            images += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if images == 0:
        raise ValueError("no images to analyse")
    stride = cfg.reduction
    layers = []
    for i in range(depth):
        entry = {"layer": i, "attn_channels": cfg.split(i)[0], "conv_channels": cfg.split(i)[1],
                 "high_freq_share": high[i] / total[i] if total[i] > 0 else 0.0}
        if dist_sum[i] is not None:
            px = (dist_sum[i] / images * stride).tolist()
            mean = sum(px) / len(px)
            entry.update(head_distance_px=px, mean_distance_px=mean,
                         diversity_std_px=math.sqrt(sum((d - mean) ** 2 for d in px) / len(px)),
                         min_distance_px=min(px), max_distance_px=max(px))
        layers.append(entry)
    return {"images": images, "grid": list(state["grid"]), "token_stride_px": stride, "cutoff": cutoff,
            "num_prefix_tokens": model.num_prefix_tokens, "layers": layers, "definitions": DEFINITIONS}


def plot(results: dict[str, dict], path) -> None:
    """One PNG with the three measures per layer, one colour per model: {label: analyze(...) result}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the analysis plots need matplotlib: pip install matplotlib "
                          "(or pip install 'eit_fast[analysis]')") from e
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for k, (label, r) in enumerate(results.items()):
        colour = f"C{k}"
        attn_layers = [e for e in r["layers"] if "head_distance_px" in e]
        for e in attn_layers:
            axes[0].scatter([e["layer"]] * len(e["head_distance_px"]), e["head_distance_px"], s=12,
                            color=colour, alpha=0.6)
        axes[0].plot([e["layer"] for e in attn_layers], [e["mean_distance_px"] for e in attn_layers],
                     color=colour, label=label)
        axes[1].plot([e["layer"] for e in attn_layers], [e["diversity_std_px"] for e in attn_layers],
                     marker="o", color=colour, label=label)
        axes[2].plot([e["layer"] for e in r["layers"]], [e["high_freq_share"] for e in r["layers"]],
                     marker="o", color=colour, label=label)
    cutoffs = sorted({r["cutoff"] for r in results.values()})
    titles = ["mean attention distance per head (px)", "head diversity: std of head distances (px)",
              f"high-frequency energy share (> {', '.join(map(str, cutoffs))} cycles/token)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
