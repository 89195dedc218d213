"""Which samples a rank sees in an epoch, and the seeds that make every batch reproducible."""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, batch, rank, ...), stable across processes and runs."""
    digest = hashlib.blake2b(np.asarray(parts, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_indices(n: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                  repeats: int = 1) -> torch.Tensor:
    """This rank's sample indices for `epoch`: the same permutation on every rank, dealt round-robin.

    Each rank gets ceil(n / world_size) indices (the permutation wraps around to even them out, as
    DistributedSampler does), so every rank runs the same number of steps. With repeats > 1 (DeiT's repeated
    augmentation) each sample appears `repeats` times in a row before dealing, so its copies land on different
    ranks with different augmentations, and the epoch keeps its length.
    """
    if n < 1:
        raise ValueError("cannot sample from an empty data set")
    if shuffle:
        g = torch.Generator().manual_seed(derive_seed(seed, epoch))
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    if repeats > 1:
        order = order.repeat_interleave(repeats)
    per_rank = -(-n // world_size)
    total = per_rank * world_size
    if total > order.numel():
        order = torch.cat([order, order[: total - order.numel()]])
    return order[rank:total:world_size]


def eval_indices(n: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """A contiguous, non-overlapping slice per rank: every sample counted exactly once."""
    bounds = [n * r // world_size for r in range(world_size + 1)]
    return torch.arange(bounds[rank], bounds[rank + 1])
