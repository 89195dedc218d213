"""Structured "impulse" initialisation of attention, closed form (our reconstruction).

arXiv 2404.01139 fits each head's Q and K by gradient descent so that softmax(P Q K^T P^T / sqrt(d)) matches
an impulse filter: the head attends to one spatial shift of the query, drawn at random in a small window.
arXiv 2505.19985 solves the same fit with an SVD. What we compute (float64, deterministic given torch's RNG):

- P (N x a): the 2-D sin-cos position embedding of the Hp x Wp token grid, layer-normed (no affine), the
  pseudo-input for models without a positional embedding. CLS tokens take no part in the fit.
- T (N x N): target logits, 1 where key = query + shift (inside the grid), else 0 (a query whose shifted
  token falls off the grid gets a flat row, as zero padding gives a conv nothing there).
- With P = U S V^T (singular values under RCOND x the largest dropped), P M P^T = U (S V^T M V S) U^T, so the
  best rank-d logit map is X = the rank-d truncation of U^T T U (Eckart-Young), and
  W_q = V S^-1 U_X sqrt(S_X) d^1/4, W_k = V S^-1 V_X sqrt(S_X) d^1/4 give P W_q W_k^T P^T / sqrt(d) = U X U^T.
- X is then scaled so the shifted token's fitted logit exceeds its row's mean by IMPULSE_MARGIN on average
  (the least-squares fit alone shrinks the peak to a near-flat softmax).
How well a head can fit is bounded by its size d: wide heads (d >= 10 on an 8x8 grid) put the argmax on the
shifted token for every query; EIT's first layers (d = 5) manage about 60% (tests/test_model_options.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMPULSE_MARGIN = 6.0  # fitted logit of the shifted token above its row's mean, on average over the grid
RCOND = 1e-2          # relative singular-value cutoff of P: keeps the fitted weights bounded


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(Hp*Wp, dim) 2-D sin-cos embedding (MAE's layout: sin y, cos y, sin x, cos x; truncated to dim)."""
    gh, gw = grid
    quarter = max(1, math.ceil(dim / 4))
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    y = ys.reshape(-1, 1) * omega
    x = xs.reshape(-1, 1) * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)[:, :dim]


def pseudo_input(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """P: the layer-normed sin-cos embedding of the grid (the paper's pseudo-input), float64."""
    return F.layer_norm(sincos_2d(grid, dim), (dim,), eps=1e-6)


def draw_shifts(num_heads: int, window: int, generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """A random (dy, dx) per head, each in [-window//2, window//2]."""
    r = window // 2
    draws = torch.randint(-r, r + 1, (num_heads, 2), generator=generator)
    return [(int(dy), int(dx)) for dy, dx in draws.tolist()]


def shift_targets(grid: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(N,) index of each query's shifted key token, -1 where it falls off the grid."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ty, tx = ys + shift[0], xs + shift[1]
    inside = (ty >= 0) & (ty < gh) & (tx >= 0) & (tx < gw)
    return torch.where(inside, ty * gw + tx, torch.full_like(ty, -1)).reshape(-1)


def fit_head(P: torch.Tensor, target: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q, W_k), each (a, head_dim), so softmax(P W_q W_k^T P^T / sqrt(d)) best matches `target` logits."""
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    keep = S > S[0] * RCOND
    U, S, V = U[:, keep], S[keep], Vh[keep].T
    Ux, Sx, Vxh = torch.linalg.svd(U.T @ target @ U)
    d = min(head_dim, Sx.numel())
    X = (Ux[:, :d] * Sx[:d]) @ Vxh[:d]
    fitted = U @ X @ U.T                             # the logits P W_q W_k^T P^T / sqrt(d) will give
    rows, cols = (target > 0).nonzero(as_tuple=True)
    margin = (fitted[rows, cols] - fitted[rows].mean(dim=1)).mean()
    gain = IMPULSE_MARGIN / margin if margin > 0 else 1.0
    root = (Sx[:d] * gain).sqrt() * head_dim ** 0.25
    back = V / S                                     # V S^-1
    wq = torch.zeros(P.shape[1], head_dim, dtype=P.dtype)
    wk = torch.zeros_like(wq)
    wq[:, :d] = back @ (Ux[:, :d] * root)
    wk[:, :d] = back @ (Vxh[:d].T * root)
    return wq, wk


def impulse_qk(grid: tuple[int, int], dim: int, num_heads: int, window: int,
               generator: torch.Generator | None = None):
    """q and k weight rows for a qkv Linear of width `dim` (each (dim, dim), head h in rows h*d:(h+1)*d),
    and the per-head shifts."""
    head_dim = dim // num_heads
    P = pseudo_input(grid, dim)
    shifts = draw_shifts(num_heads, window, generator)
    n = P.shape[0]
    wq_rows, wk_rows = [], []
    for shift in shifts:
        t = shift_targets(grid, shift)
        target = torch.zeros(n, n, dtype=torch.float64)
        rows = (t >= 0).nonzero().squeeze(1)
        target[rows, t[rows]] = 1.0
        wq, wk = fit_head(P, target, head_dim)
        wq_rows.append(wq.T)
        wk_rows.append(wk.T)
    return torch.cat(wq_rows), torch.cat(wk_rows), shifts
