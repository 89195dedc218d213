"""Loaders, sampling and device-side augmentation: determinism, sharding, and what each transform does."""
import random

import numpy as np
import pytest
import torch

from eit_fast.data.augment import MixupConfig, mixup_cutmix, normalization, normalize, one_hot_smooth, \
    random_crop_flip
from eit_fast.data.loader import AugmentConfig, TensorLoader, WorkerLoader
from eit_fast.data.sampling import derive_seed, epoch_indices, eval_indices


def images(n, size=8):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


def test_epoch_indices_shard_the_same_permutation():
    shards = [epoch_indices(10, epoch=3, seed=1, rank=r, world_size=3) for r in range(3)]
    assert all(len(s) == 4 for s in shards)                 # ceil(10 / 3), padded by wrapping
    assert set(torch.cat(shards).tolist()) == set(range(10))
    assert torch.equal(epoch_indices(10, 3, 1), epoch_indices(10, 3, 1))
    assert not torch.equal(epoch_indices(10, 3, 1), epoch_indices(10, 4, 1))


def test_repeated_augmentation_keeps_the_epoch_length_and_spreads_copies():
    shards = [epoch_indices(12, 0, 0, r, 3, repeats=3) for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    first = [s[0].item() for s in shards]
    assert first[0] == first[1] == first[2]  # one sample's three copies go to the three ranks


def test_eval_indices_cover_every_sample_once():
    parts = [eval_indices(11, r, 4) for r in range(4)]
    assert torch.equal(torch.cat(parts), torch.arange(11))


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, e, b) for e in range(20) for b in range(20)}) == 400
    assert 0 <= derive_seed(2**40, 7) < 2**63


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = images(64)
    out = random_crop_flip(x, padding=2, flip=False, gen=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = set()
    for i in range(64):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert hits, f"sample {i} is not a crop of its padded image"
        shifts.add(hits[0])
    assert len(shifts) > 10  # offsets really vary per sample


def test_flip_flips_about_half():
    x = images(200)
    out = random_crop_flip(x, padding=0, flip=True, gen=torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(200)]
    kept = [torch.equal(out[i], x[i]) for i in range(200)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 70 < sum(flipped) < 130


def test_normalize():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x, *normalization("cpu", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0)))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    zero = normalize(torch.zeros_like(x), *normalization("cpu", mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0)))
    assert torch.allclose(zero[0, :, 0, 0], torch.tensor([-2.0, -1.0, -0.5]))


def test_smoothing_targets():
    t = one_hot_smooth(torch.tensor([2, 0]), 4, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert torch.allclose(t[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))


@pytest.mark.parametrize("cfg", [MixupConfig(mixup_alpha=0.8, smoothing=0.1), MixupConfig(cutmix_alpha=1.0)])
def test_mixup_cutmix_mix_images_and_targets_with_the_same_lambda(cfg):
    x = torch.randn(6, 3, 16, 16)
    labels = torch.arange(6)
    out, target = mixup_cutmix(x, labels, 6, cfg, np.random.default_rng(3))
    assert torch.allclose(target.sum(1), torch.ones(6))
    assert not torch.equal(out, x)
    base = one_hot_smooth(labels, 6, cfg.smoothing)
    lam = (target[0] - base.flip(0)[0]) / (base[0] - base.flip(0)[0])  # target = lam*y + (1-lam)*y_partner
    lam = lam[0].item()
    if cfg.cutmix_alpha:  # the pasted area is exactly 1 - lam
        pasted = (out[0] != x[0]).any(0).float().mean().item()
        assert abs(pasted - (1 - lam)) < 1e-6
    else:
        assert torch.allclose(out, x * lam + x.flip(0) * (1 - lam))


def tensor_loader(n=50, train=True, **kw):
    torch.manual_seed(0)
    x, y = images(n), torch.arange(n) % 5
    aug = AugmentConfig(crop_padding=1, mixup=MixupConfig(mixup_alpha=0.5, cutmix_alpha=1.0, smoothing=0.1))
    return TensorLoader(x, y, batch_size=8, train=train, num_classes=5, device="cpu", aug=aug, seed=4, **kw)


def test_tensor_loader_resumes_mid_epoch_exactly():
    loader = tensor_loader()
    assert len(loader) == 6  # full batches only
    full = list(loader.batches(epoch=2))
    tail = list(loader.batches(epoch=2, start=3))
    assert len(tail) == 3
    for a, b in zip(full[3:], tail):
        assert torch.equal(a.images, b.images) and torch.equal(a.target, b.target)
    other = list(loader.batches(epoch=3))
    assert not torch.equal(full[0].images, other[0].images)


def test_tensor_loader_ranks_get_the_same_number_of_distinct_batches():
    r0, r1 = tensor_loader(rank=0, world_size=2), tensor_loader(rank=1, world_size=2)
    assert len(r0) == len(r1) == 3
    a, b = next(r0.batches(0)), next(r1.batches(0))
    assert not torch.equal(a.labels, b.labels) or not torch.equal(a.images, b.images)


def test_eval_loader_is_plain_and_complete():
    loader = tensor_loader(n=50, train=False)
    batches = list(loader.batches(0))
    assert len(loader) == len(batches) == 7  # the last, partial batch is kept
    labels = torch.cat([b.labels for b in batches])
    assert torch.equal(labels, torch.arange(50) % 5)
    assert torch.equal(batches[0].images, normalize(loader.images[:8], loader.scale, loader.shift))
    assert torch.equal(batches[0].target, batches[0].labels)


def test_worker_loader_is_deterministic_whatever_the_worker_count():
    pytest.importorskip("torchvision")
    x, y = images(24, size=16), torch.arange(24) % 3
    aug = AugmentConfig(randaugment=(2, 9), random_erasing=0.5)
    kw = dict(img_size=12, batch_size=4, train=True, num_classes=3, device="cpu", aug=aug, seed=1)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    a = list(WorkerLoader(x, y, workers=0, **kw).batches(1))
    # the training process's RNGs (dropout, drop-path) are untouched, or resume could not be exact
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    b = list(WorkerLoader(x, y, workers=2, **kw).batches(1, start=2))
    assert len(a) == 6 and len(b) == 4 and a[0].images.shape == (4, 3, 12, 12)
    for p, q in zip(a[2:], b):
        assert torch.equal(p.images, q.images) and torch.equal(p.labels, q.labels)
