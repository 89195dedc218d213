"""Two loaders with one interface: `len(loader)` batches per epoch and `loader.batches(epoch, start)`.

- TensorLoader: small images decoded once into a uint8 tensor, kept on the GPU when it fits (else in pinned
  host memory); cropping, flipping, normalisation and Mixup/CutMix run there, batch-wide.
- WorkerLoader: larger images through DataLoader workers with torchvision's transforms (RandomResizedCrop,
  RandAugment, random erasing); Mixup/CutMix on the device.
Every random choice is derived from (seed, epoch, position, rank), so `batches(epoch, start)` yields exactly
what an uninterrupted run would from batch `start` on, whatever the worker count.
"""
from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..configs import ConfigError, eval_crop_pct
from .arrays import DataError
from .folder import to_rgb
from .augment import IMAGENET_MEAN, IMAGENET_STD, MixupConfig, mixup_cutmix, normalization, normalize, \
    one_hot_smooth, random_crop_flip
from .sampling import derive_seed, epoch_indices, eval_indices


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = 4              # TensorLoader: random crop of the zero-padded image
    hflip: bool = True
    mixup: MixupConfig = field(default_factory=MixupConfig)
    repeats: int = 1                   # DeiT's repeated augmentation
    # WorkerLoader only (torchvision transforms in the workers):
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    randaugment: tuple[int, int] | None = None   # (num_ops, magnitude)
    random_erasing: float = 0.0

    @property
    def needs_workers(self) -> bool:
        return self.randaugment is not None or self.random_erasing > 0


@dataclass
class Batch:
    images: torch.Tensor    # float32 (B, 3, H, W), normalised, on the device
    target: torch.Tensor    # int64 labels, or float (B, classes) soft targets when smoothing/mixing
    labels: torch.Tensor    # int64 (B,), the hard labels (for accuracy)


class _Base:
    def __init__(self, num_samples: int, batch_size: int, train: bool, num_classes: int, aug: AugmentConfig,
                 seed: int, rank: int, world_size: int, device: torch.device):
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        self.num_samples, self.batch_size, self.train = num_samples, batch_size, train
        self.num_classes, self.aug, self.seed = num_classes, aug, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        if train and len(self) == 0:
            raise DataError(f"{num_samples} training samples over {world_size} rank(s) give no full batch "
                            f"of {batch_size}; lower --batch-size")

    def indices(self, epoch: int) -> torch.Tensor:
        if self.train:
            return epoch_indices(self.num_samples, epoch, self.seed, self.rank, self.world_size,
                                 repeats=self.aug.repeats)
        return eval_indices(self.num_samples, self.rank, self.world_size)

    def __len__(self) -> int:
        if self.train:  # full batches only, the same count on every rank
            return -(-self.num_samples // self.world_size) // self.batch_size
        return -(-len(eval_indices(self.num_samples, self.rank, self.world_size)) // self.batch_size)

    def batches_on_every_rank(self) -> int:
        """Batches that every rank's share holds: the points where all ranks can meet in an epoch (evaluation
        shares differ by up to one sample, so their batch counts may differ by one)."""
        if self.train:
            return len(self)
        return min(-(-len(eval_indices(self.num_samples, r, self.world_size)) // self.batch_size)
                   for r in range(self.world_size))

    def _finish(self, x: torch.Tensor, labels: torch.Tensor, epoch: int, b: int) -> Batch:
        """Soft targets and Mixup/CutMix for training batches; hard labels for evaluation."""
        if not self.train:
            return Batch(x, labels, labels)
        mix = self.aug.mixup
        if mix.active:
            rng = np.random.default_rng(derive_seed(self.seed, epoch, b, self.rank, 1))
            x, target = mixup_cutmix(x, labels, self.num_classes, mix, rng)
        elif mix.smoothing > 0:
            target = one_hot_smooth(labels, self.num_classes, mix.smoothing)
        else:
            target = labels
        return Batch(x, target, labels)


class TensorLoader(_Base):
    """Batches from an in-memory uint8 image tensor (N, 3, H, W)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, train: bool,
                 num_classes: int, device, aug: AugmentConfig = AugmentConfig(), seed: int = 0, rank: int = 0,
                 world_size: int = 1, storage: str = "device"):
        super().__init__(len(images), batch_size, train, num_classes, aug, seed, rank, world_size, device)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if storage == "device":
            self.images, self.labels = images.to(self.device), labels.to(self.device)
        elif storage == "host":
            self.images, self.labels = images, labels
        else:
            raise ValueError(f"storage must be 'device' or 'host', got {storage!r}")
        self.storage = storage
        self.scale, self.shift = normalization(self.device)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        order = self.indices(epoch)
        if self.storage == "device":
            order = order.to(self.device)
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x, labels = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            if self.storage == "host" and self.device.type == "cuda":  # pinned, so the copy is asynchronous
                x, labels = x.pin_memory(), labels.pin_memory()
            x = x.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.train:
                gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, epoch, b, self.rank))
                x = random_crop_flip(x, self.aug.crop_padding, self.aug.hflip, gen)
            yield self._finish(normalize(x, self.scale, self.shift), labels, epoch, b)


class _SeededItems(torch.utils.data.Dataset):
    """Items are (index, seed): each sample's transforms draw from its own seed, whichever worker runs it."""

    def __init__(self, source, labels: torch.Tensor, transform):
        self.source, self.labels, self.transform = source, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        index, seed = item
        if torch.utils.data.get_worker_info() is not None:
            return self._load(index, seed)
        # workers=0 runs here, in the training process: leave its RNGs (dropout, drop-path) as they were
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                return self._load(index, seed)
        finally:
            random.setstate(py_state)

    def _load(self, index: int, seed: int):
        # torchvision's transforms draw from torch's CPU and Python's global RNGs; the CUDA ones (dropout on
        # the GPU when workers=0) are not theirs to reseed
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        return self.transform(self._image(index)), self.labels[index]

    def _image(self, index: int):
        from PIL import Image
        src = self.source[index]
        if isinstance(src, torch.Tensor):  # an in-memory uint8 (3, H, W) image
            return Image.fromarray(src.permute(1, 2, 0).numpy())
        try:
            with Image.open(src) as im:
                im.load()  # decode now: the file closes when this block ends
                rgb = to_rgb(im)
                return rgb.copy() if rgb is im else rgb
        except Exception as e:  # a corrupt file, or one over PIL's pixel limit: name it, whatever failed
            raise DataError(f"cannot read image {src}: {type(e).__name__}: {e}") from e


class _ItemSampler(torch.utils.data.Sampler):
    """The sampler is re-aimed each epoch; with persistent workers it still runs in the main process."""

    def __init__(self):
        self.items: list = []

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def worker_transforms(img_size: int, train: bool, aug: AugmentConfig):
    try:
        from torchvision import transforms as T
    except ImportError as e:
        raise ConfigError("the DataLoader pipeline for large images (RandomResizedCrop, RandAugment, random "
                          "erasing) uses torchvision: install the release that matches your torch "
                          "(for torch 2.14.1: pip install torchvision==0.29.1)") from e
    bicubic = T.InterpolationMode.BICUBIC
    if not train:  # DeiT's evaluation: resize to img/crop_pct, centre crop (what pretrained_cfg says)
        return T.Compose([T.Resize(int(img_size / eval_crop_pct(img_size)), interpolation=bicubic),
                          T.CenterCrop(img_size),
                          T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ops = [T.RandomResizedCrop(img_size, scale=aug.rrc_scale, interpolation=bicubic)]
    if aug.hflip:
        ops.append(T.RandomHorizontalFlip())
    if aug.randaugment is not None:
        n, m = aug.randaugment
        ops.append(T.RandAugment(num_ops=n, magnitude=m, interpolation=bicubic))
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if aug.random_erasing > 0:
        ops.append(T.RandomErasing(p=aug.random_erasing, value="random"))
    return T.Compose(ops)


def _leave_stop_signals_to_the_trainer(worker_id: int):
    """A scheduler signals every process of a job (SLURM's scancel) and a terminal's Ctrl-C reaches the whole
    process group; torch's workers die of SIGTERM, and the trainer would then fail on its next batch instead
    of stopping with a checkpoint. So workers ignore stop requests: the process they serve acts on them and
    shuts them down (and they still end by themselves when it is gone)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class WorkerLoader(_Base):
    """Batches through DataLoader workers; `source` is a sequence of image paths or uint8 (3, H, W) tensors."""

    def __init__(self, source: Sequence[Path] | torch.Tensor, labels: torch.Tensor, *, img_size: int,
                 batch_size: int, train: bool, num_classes: int, device, aug: AugmentConfig = AugmentConfig(),
                 seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 4):
        super().__init__(len(labels), batch_size, train, num_classes, aug, seed, rank, world_size, device)
        self.sampler = _ItemSampler()
        dataset = _SeededItems(source, torch.as_tensor(labels), worker_transforms(img_size, train, aug))
        # Its own generator: iter() draws a base seed, which must not move the global RNG that dropout and
        # drop-path use, or a resumed run would diverge from a straight one.
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers, drop_last=train,
            generator=torch.Generator(),
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None, worker_init_fn=_leave_stop_signals_to_the_trainer)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        order = self.indices(epoch)[start * self.batch_size:].tolist()
        first = start * self.batch_size
        self.sampler.items = [(i, derive_seed(self.seed, epoch, first + k, self.rank))
                              for k, i in enumerate(order)]
        for b, (x, labels) in enumerate(self.loader, start=start):
            x = x.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield self._finish(x, labels, epoch, b)
