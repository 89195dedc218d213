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

from .arrays import DataError, ImageArrays
from .cifar import find_cifar, read_cifar
from .folder import decode_folder, scan_image_folder
from .loader import AugmentConfig, TensorLoader, WorkerLoader
from .synthetic import make_synthetic

CACHE_MAX_SIDE = 64            # images up to this side are decoded once and cached as a tensor
DEVICE_CACHE_FRACTION = 0.25   # keep the cache on the GPU if it takes at most this share of free memory
SYNTHETIC_VAL = 2000


@dataclass
class DataSpec:
    data: str = "synthetic"
    img_size: int = 32
    batch_size: int = 128
    eval_batch_size: int | None = None
    aug: AugmentConfig = AugmentConfig()
    cache: str = "auto"          # auto | device | host | none
    workers: int = 4
    synthetic_size: int = 10000
    decode_cache_dir: str | None = None


@dataclass
class Data:
    train: TensorLoader | WorkerLoader
    val: TensorLoader | WorkerLoader
    classes: list[str]
    description: str


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


def build_data(spec: DataSpec, *, device, seed: int = 0, rank: int = 0, world_size: int = 1) -> Data:
    device = torch.device(device)
    common = dict(device=device, seed=seed, rank=rank, world_size=world_size)
    eval_bs = spec.eval_batch_size or spec.batch_size

    train_arrays = val_arrays = None
    if spec.data == "synthetic":
        train_arrays = make_synthetic(spec.synthetic_size, spec.img_size, seed=seed)
        val_arrays = make_synthetic(SYNTHETIC_VAL, spec.img_size, seed=seed + 1_000_003)
        train_src = val_src = None
    else:
        root = Path(spec.data)
        if not root.exists():
            raise DataError(f"data folder not found: {root}")
        kind = find_cifar(root)
        if kind is not None:
            train_arrays, val_arrays = read_cifar(root, kind, train=True), read_cifar(root, kind, train=False)
        else:
            train_src, val_src = split_folders(root)

    if train_arrays is not None:  # already decoded in memory
        classes = train_arrays.classes
        side = train_arrays.images.shape[-1]
        if _use_tensor_loader(spec, side) and side == spec.img_size:
            return _tensor_data(spec, train_arrays, val_arrays, common, eval_bs)
        train_items, val_items = train_arrays.images, val_arrays.images
        train_labels, val_labels = train_arrays.labels, val_arrays.labels
        desc = f"{train_arrays.source}: {len(train_labels)} train / {len(val_labels)} val images"
    else:
        train_items, train_labels, classes = scan_image_folder(train_src)
        val_items, val_labels, val_classes = scan_image_folder(val_src)
        if val_classes != classes:
            raise DataError(f"{val_src}: its classes differ from {train_src}'s "
                            f"({len(val_classes)} vs {len(classes)} classes)")
        if _use_tensor_loader(spec, spec.img_size if spec.img_size <= CACHE_MAX_SIDE else None):
            cache_dir = spec.decode_cache_dir or default_decode_cache_dir()
            return _tensor_data(spec, decode_folder(train_src, spec.img_size, cache_dir=cache_dir),
                                decode_folder(val_src, spec.img_size, cache_dir=cache_dir), common, eval_bs)
        desc = f"ImageFolder {spec.data}: {len(train_labels)} train / {len(val_labels)} val images"

    labels = (torch.as_tensor(train_labels), torch.as_tensor(val_labels))
    kw = dict(img_size=spec.img_size, num_classes=len(classes), aug=spec.aug, workers=spec.workers, **common)
    train = WorkerLoader(train_items, labels[0], batch_size=spec.batch_size, train=True, **kw)
    val = WorkerLoader(val_items, labels[1], batch_size=eval_bs, train=False, **kw)
    return Data(train, val, list(classes), desc + f", {spec.workers} DataLoader workers")


def _tensor_data(spec: DataSpec, train: ImageArrays, val: ImageArrays, common: dict, eval_bs: int) -> Data:
    nbytes = train.images.numel() + val.images.numel()
    storage = _storage(spec, nbytes, common["device"])
    kw = dict(num_classes=len(train.classes), storage=storage, **common)
    train_loader = TensorLoader(train.images, train.labels, batch_size=spec.batch_size, train=True,
                                aug=spec.aug, **kw)
    val_loader = TensorLoader(val.images, val.labels, batch_size=eval_bs, train=False, **kw)
    where = "on the device" if storage == "device" else "in host memory"
    desc = (f"{train.source}: {len(train.labels)} train / {len(val.labels)} val images, "
            f"{nbytes / 2**20:.0f} MiB uint8 cache {where}")
    return Data(train_loader, val_loader, list(train.classes), desc)
