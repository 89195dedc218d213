"""A procedurally generated image-classification data set, so that a training run needs no download.

Each class is a visual pattern (stripes at three orientations, a checkerboard, and six shapes). Colours
of foreground and background are drawn independently of the class, and position, scale, orientation,
frequency, phase and pixel noise are random, so a model has to learn shapes and textures: a small vision
transformer gets well above chance after a short training but not 100% at once, and the mean colour of an
image says nothing about its class.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .arrays import ImageArrays

PATTERNS: tuple[str, ...] = (
    "horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard",
    "disc", "ring", "square", "cross", "triangle", "dots",
)
MIN_IMG_SIZE = 8           # below this the shapes are a few pixels and the classes blur together
_CHUNK_PIXELS = 1 << 19    # images rendered at a time x pixels per image: bounds memory at large img_size
_MIN_CONTRAST = 0.4        # least RGB distance between foreground and background colours
_NOISE_SIGMA = (0.02, 0.12)  # range of the per-image standard deviation of the additive pixel noise
_JITTER = np.deg2rad(12.0)  # orientation jitter of stripes and checkerboards

_F = np.float32
# A pattern renderer: (number of images, image size, rng) -> signed distance to the pattern's edge, in
# pixels, shape (n, S, S), positive on the foreground. Edges are anti-aliased from it.
_Renderer = Callable[[int, int, np.random.Generator], np.ndarray]


def make_synthetic(num_samples: int, img_size: int = 32, num_classes: int = 10, seed: int = 0) -> ImageArrays:
    """Generate `num_samples` images of `img_size` x `img_size` pixels in `num_classes` balanced classes.

    Deterministic for a given (num_samples, img_size, num_classes, seed); use different seeds for the
    training and validation sets. Class names are the first `num_classes` of PATTERNS.
    """
    if num_samples < 1:
        raise ValueError(f"make_synthetic: num_samples must be >= 1, got {num_samples}")
    if not 2 <= num_classes <= len(PATTERNS):
        raise ValueError(f"make_synthetic: num_classes must be between 2 and {len(PATTERNS)} (one class per "
                         f"pattern: {', '.join(PATTERNS)}), got {num_classes}")
    if img_size < MIN_IMG_SIZE:
        raise ValueError(f"make_synthetic: img_size must be >= {MIN_IMG_SIZE}, got {img_size}")
    rng = np.random.default_rng(seed)
    # Exactly balanced classes (sizes differ by at most one), in random order.
    labels = rng.permutation(np.arange(num_samples) % num_classes)
    images = np.empty((num_samples, 3, img_size, img_size), dtype=np.uint8)
    chunk = max(1, _CHUNK_PIXELS // (img_size * img_size))
    for start in range(0, num_samples, chunk):
        images[start:start + chunk] = _render(labels[start:start + chunk], img_size, rng)
    return ImageArrays(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(PATTERNS[:num_classes]),
        source=f"synthetic(num_samples={num_samples}, img_size={img_size}, num_classes={num_classes}, "
               f"seed={seed})",
    )


def _render(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    dist = np.empty((n, size, size), dtype=_F)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        dist[idx] = _RENDERERS[c](len(idx), size, rng)
    dist += 0.5
    mask = np.clip(dist, 0.0, 1.0, out=dist)[:, None]  # 1-pixel soft edge
    # Colours independent of the class; a foreground too close to its background is moved half-way
    # round the colour cube, so that the pattern is always visible.
    bg = rng.random((n, 3), dtype=_F)
    fg = rng.random((n, 3), dtype=_F)
    faint = np.linalg.norm(fg - bg, axis=1) < _MIN_CONTRAST
    fg[faint] = (bg[faint] + 0.5) % 1.0
    sigma = rng.uniform(*_NOISE_SIGMA, size=(n, 1, 1, 1)).astype(_F)
    # In place, on one buffer: these arrays are large and allocating is what costs here.
    img = rng.standard_normal((n, 3, size, size), dtype=_F)
    img *= sigma
    img += bg[:, :, None, None]
    img += (fg - bg)[:, :, None, None] * mask
    np.clip(img, 0.0, 1.0, out=img)
    img *= 255.0
    img += 0.5
    return img.astype(np.uint8)


# ---- geometry helpers: every array is (n, S, S) or broadcasts to it ----

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.arange(size, dtype=_F) + 0.5  # pixel centres
    return g[None, :, None], g[None, None, :]  # y, x


def _col(a: np.ndarray) -> np.ndarray:
    return a.astype(_F)[:, None, None]


def _centred(n: int, size: int, rng: np.random.Generator, extent: np.ndarray,
             max_rot: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) relative to a random centre that keeps a shape of radius `extent` mostly inside,
    rotated by a random angle in [-max_rot, max_rot]."""
    slack = np.maximum(size / 2 - extent, 0.0) * 0.9
    cy = size / 2 + rng.uniform(-1, 1, n) * slack
    cx = size / 2 + rng.uniform(-1, 1, n) * slack
    t = rng.uniform(-max_rot, max_rot, n)
    y, x = _grid(size)
    dy, dx = y - _col(cy), x - _col(cx)
    cos, sin = _col(np.cos(t)), _col(np.sin(t))
    return dx * cos + dy * sin, -dx * sin + dy * cos


def _triangle_wave(coord: np.ndarray, period: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Signed distance, in pixels, to the nearest edge of stripes of the given period: positive on half."""
    p = _col(period)
    frac = np.mod(coord / p + _col(phase), 1.0)
    return (1.0 - 4.0 * np.abs(frac - 0.5)) * (p / 4.0)


def _periods(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(max(4.0, size / 8), max(5.0, size / 3.2), n)


def _stripes(angle: Callable[[int, np.random.Generator], np.ndarray]) -> _Renderer:
    def render(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
        t = angle(n, rng) + rng.uniform(-_JITTER, _JITTER, n)  # direction across the stripes
        y, x = _grid(size)
        u = x * _col(np.cos(t)) + y * _col(np.sin(t))
        duty = _col(rng.uniform(-0.3, 0.3, n))  # stripe thickness varies too
        p = _periods(n, size, rng)
        return _triangle_wave(u, p, rng.random(n)) + duty * _col(p) / 4.0
    return render


def _checkerboard(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _centred(n, size, rng, np.full(n, size / 2), _JITTER)
    p = _periods(n, size, rng)
    a, b = _triangle_wave(u, p, rng.random(n)), _triangle_wave(v, p, rng.random(n))
    return np.sign(a * b) * np.minimum(np.abs(a), np.abs(b))


def _disc(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(0.16, 0.38, n) * size
    u, v = _centred(n, size, rng, r, 0.0)
    return _col(r) - np.sqrt(u * u + v * v)


def _ring(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(0.22, 0.42, n) * size
    half_width = np.maximum(rng.uniform(0.06, 0.2, n) * r, 0.8)
    u, v = _centred(n, size, rng, r, 0.0)
    return _col(half_width) - np.abs(np.sqrt(u * u + v * v) - _col(r - half_width))


def _square(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    h = rng.uniform(0.14, 0.32, n) * size  # half side
    u, v = _centred(n, size, rng, h * 1.2, np.deg2rad(15.0))
    return _col(h) - np.maximum(np.abs(u), np.abs(v))


def _cross(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    arm = rng.uniform(0.22, 0.42, n) * size
    w = np.maximum(rng.uniform(0.05, 0.12, n) * size, 0.8)  # half width of a bar
    u, v = _centred(n, size, rng, arm, np.deg2rad(15.0))
    au, av, arm_, w_ = np.abs(u), np.abs(v), _col(arm), _col(w)
    return np.maximum(np.minimum(w_ - au, arm_ - av), np.minimum(w_ - av, arm_ - au))


def _triangle(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    big_r = rng.uniform(0.24, 0.44, n) * size  # circumradius; the inradius is half of it
    u, v = _centred(n, size, rng, big_r * 0.8, np.pi)  # any orientation
    out = None
    for k in range(3):  # inside = on the inner side of all three edges
        a = 2 * np.pi * k / 3
        d = _col(big_r / 2) - (u * _F(np.cos(a)) + v * _F(np.sin(a)))
        out = d if out is None else np.minimum(out, d)
    return out


def _dots(n: int, size: int, rng: np.random.Generator, max_dots: int = 8) -> np.ndarray:
    count = rng.integers(4, max_dots + 1, n)
    r = np.maximum(rng.uniform(0.04, 0.08, (n, max_dots)) * size, 1.0)
    cy = rng.uniform(r, size - r)
    cx = rng.uniform(r, size - r)
    r[np.arange(max_dots)[None, :] >= count[:, None]] = -size  # unused dots never cover a pixel
    y, x = _grid(size)
    y, x = y[:, None], x[:, None]  # (1, 1, S, 1), (1, 1, 1, S)
    c = lambda a: a.astype(_F)[:, :, None, None]  # noqa: E731
    d = c(r) - np.sqrt((y - c(cy)) ** 2 + (x - c(cx)) ** 2)
    return d.max(axis=1)


_RENDERERS: tuple[_Renderer, ...] = (
    _stripes(lambda n, rng: np.full(n, np.pi / 2)),                      # horizontal stripes: vary along y
    _stripes(lambda n, rng: np.zeros(n)),                                # vertical stripes: vary along x
    _stripes(lambda n, rng: rng.choice([np.pi / 4, -np.pi / 4], n)),     # either diagonal
    _checkerboard, _disc, _ring, _square, _cross, _triangle, _dots,
)
assert len(_RENDERERS) == len(PATTERNS)
