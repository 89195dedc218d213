"""From a `--data` argument to a (train, val) pair of loaders.

`data` is "synthetic" (the built-in procedural set), a CIFAR-10/100 python-pickle folder, or a folder with
`train/` and `val/` (or `test/`) ImageFolder trees. Small images are decoded once into a uint8 tensor
(TensorLoader, kept on the GPU when it fits); larger ones, or RandAugment / random erasing, go through
DataLoader workers (WorkerLoader).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .arrays import DataError
from .cifar import find_cifar, read_cifar
from .fingerprint import class_difference, split_fingerprint
from .folder import decode_folder, scan_image_folder
from .loader import AugmentConfig, TensorLoader, WorkerLoader
from .synthetic import make_synthetic

CACHE_MAX_SIDE = 64            # images up to this side are decoded once and cached as a tensor
DEVICE_CACHE_FRACTION = 0.25   # keep the cache on the GPU if it takes at most this share of free memory
SYNTHETIC_VAL_FRACTION = 0.25  # validation images per training image of the synthetic set


@dataclass
class DataSpec:
    data: str = "synthetic"
    img_size: int = 32
    batch_size: int = 128
    eval_batch_size: int | None = None
    aug: AugmentConfig = AugmentConfig()
    cache: str = "auto"          # auto | device | host | none
    workers: int = 4
    synthetic_size: int = 8000
    train_subset: int | None = None  # train on a fixed random subset of this many images
    decode_cache_dir: str | None = None


@dataclass
class Data:
    train: TensorLoader | WorkerLoader | None
    val: TensorLoader | WorkerLoader
    classes: list[str]
    description: str
    fingerprint: dict | None = None  # {"train": ..., "val": ...} when the training loader was built


def default_decode_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "eit_fast")


def split_folders(root: Path) -> tuple[Path, Path]:
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{root}: expected an ImageFolder tree with train/ and val/ (or test/) sub-folders, "
                        f"a CIFAR python folder, or 'synthetic'; found no {train}")
    for name in ("val", "test"):
        if (root / name).is_dir():
            return train, root / name
    raise DataError(f"{root}: has train/ but no val/ or test/ folder to evaluate on")


def subset_indices(n: int, k: int | None, seed: int) -> torch.Tensor | None:
    """A fixed random subset of k of n training samples (the same on every rank), or None for all."""
    if k is None:
        return None
    if not 0 < k <= n:
        raise DataError(f"--train-subset {k} must be between 1 and the {n} training images")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def _storage(spec: DataSpec, nbytes: int, device: torch.device) -> str:
    if spec.cache in ("device", "host"):
        return spec.cache
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return "device" if nbytes <= DEVICE_CACHE_FRACTION * free else "host"
    return "device"  # on the CPU the "device" is host memory


def _use_tensor_loader(spec: DataSpec, side: int | None) -> bool:
    if spec.cache == "none" or spec.aug.needs_workers:
        return False
    return spec.cache in ("device", "host") or (side is not None and side <= CACHE_MAX_SIDE)


@dataclass
class _Split:
    """One split before loading: decoded images (uint8 tensor) or image paths still to read."""
    items: torch.Tensor | list
    labels: torch.Tensor
    classes: list[str]
    source: str
    root: Path | None = None  # the folder image paths are relative to

    def select(self, keep: torch.Tensor | None) -> "_Split":
        if keep is None:
            return self
        items = self.items[keep] if isinstance(self.items, torch.Tensor) else [self.items[i] for i in keep.tolist()]
        return _Split(items, self.labels[keep], self.classes, f"{self.source} (subset of {len(keep)})", self.root)

    def relabel(self, classes: list[str]) -> "_Split":
        """Labels indexing `classes` (the list a model was trained with) instead of this split's own order."""
        if self.classes == classes:
            return self
        if sorted(self.classes) != sorted(classes):
            raise DataError(f"{self.source}: its classes are not the ones the weights were trained on "
                            f"({class_difference(classes, self.classes)})")
        lut = torch.tensor([classes.index(c) for c in self.classes], dtype=torch.int64)
        return _Split(self.items, lut[self.labels], list(classes), self.source, self.root)

    def fingerprint(self) -> dict:
        return split_fingerprint(self.items, self.labels, self.classes, self.root)


def _read_splits(spec: DataSpec, seed: int, cached: bool) -> tuple[_Split, _Split]:
    """The train and val splits; ImageFolder trees are decoded now when they will be cached."""
    if spec.data == "synthetic":
        n_val = max(100, int(spec.synthetic_size * SYNTHETIC_VAL_FRACTION))
        try:
            arrays = (make_synthetic(spec.synthetic_size, spec.img_size, seed=seed),
                      make_synthetic(n_val, spec.img_size, seed=seed + 1_000_003))
        except ValueError as e:  # a size it cannot draw (e.g. --img-size below 8)
            raise DataError(f"synthetic data: {e}") from e
    else:
        root = Path(spec.data)
        if not root.exists():
            raise DataError(f"data folder not found: {root}")
        kind = find_cifar(root)
        if kind is not None:
            arrays = (read_cifar(root, kind, train=True), read_cifar(root, kind, train=False))
        else:
            folders = split_folders(root)
            scans = [scan_image_folder(f) for f in folders]
            if scans[1][2] != scans[0][2]:
                raise DataError(f"{folders[1]}: its classes differ from {folders[0]}'s "
                                f"({class_difference(scans[0][2], scans[1][2])})")
            if not cached:
                return tuple(_Split(paths, torch.as_tensor(labels), classes, f"ImageFolder {folder}", folder)
                             for folder, (paths, labels, classes) in zip(folders, scans))
            cache_dir = spec.decode_cache_dir or default_decode_cache_dir()
            arrays = tuple(decode_folder(f, spec.img_size, cache_dir=cache_dir) for f in folders)
    return tuple(_Split(a.images, a.labels, a.classes, a.source) for a in arrays)


def build_data(spec: DataSpec, *, device, seed: int = 0, rank: int = 0, world_size: int = 1,
               train: bool = True, classes: list[str] | None = None) -> Data:
    """Loaders for `spec`; with train=False only the validation loader is built (Data.train is None).

    classes: the class list a model was trained with; labels then index it (a data set with the same classes
    in another order is relabelled, one with other classes refused)."""
    device = torch.device(device)
    # Folders are cached at the model's size if it is small; in-memory sets keep their own size.
    cached = _use_tensor_loader(spec, spec.img_size if spec.img_size <= CACHE_MAX_SIDE else None)
    train_split, val_split = _read_splits(spec, seed, cached)
    train_split = train_split.select(subset_indices(len(train_split.labels), spec.train_subset, seed))
    if classes is not None:
        train_split, val_split = train_split.relabel(list(classes)), val_split.relabel(list(classes))
    classes = train_split.classes
    fingerprint = {"train": train_split.fingerprint(), "val": val_split.fingerprint()} if train else None
    decoded = isinstance(train_split.items, torch.Tensor)
    if decoded and train_split.items.shape[-1] != spec.img_size:
        cached = False  # e.g. 32 px CIFAR for a 224 px model: resize in the workers
    common = dict(num_classes=len(classes), device=device, seed=seed, rank=rank, world_size=world_size)
    eval_bs = spec.eval_batch_size or spec.batch_size
    if train:
        desc = f"{train_split.source}: {len(train_split.labels)} train / {len(val_split.labels)} val images"
    else:
        desc = f"{val_split.source}: {len(val_split.labels)} images"
    if cached:
        nbytes = train_split.items.numel() * train + val_split.items.numel()
        storage = _storage(spec, nbytes, device)
        desc += (f", {nbytes / 2**20:.0f} MiB uint8 cache "
                 f"{'on the device' if storage == 'device' else 'in host memory'}")
    else:
        desc += f", {spec.workers} DataLoader workers"

    def make(split: _Split, is_train: bool, batch_size: int):
        if cached:
            return TensorLoader(split.items, split.labels, batch_size=batch_size, train=is_train, aug=spec.aug,
                                storage=storage, **common)
        return WorkerLoader(split.items, split.labels, img_size=spec.img_size, batch_size=batch_size,
                            train=is_train, aug=spec.aug, workers=spec.workers, **common)

    return Data(make(train_split, True, spec.batch_size) if train else None, make(val_split, False, eval_bs),
                list(classes), desc, fingerprint)
