"""Readers of the CIFAR-10 and CIFAR-100 "python version" folders (pickled dicts of numpy arrays).

Layouts (as unpacked from the official tarballs; `root` may also be the inner folder itself):
  root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
  root/cifar-100-python/{train, test, meta}

The files are pickles, and unpickling can run arbitrary code. They are read with an unpickler that only
resolves the few numpy names an array needs and refuses every other global, so a tampered file fails
with a DataError instead of executing anything.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch

from .arrays import DataError, ImageArrays

CifarName = Literal["cifar10", "cifar100"]

_IMAGE_SIZE = 32
_ROW = 3 * _IMAGE_SIZE * _IMAGE_SIZE  # one image per row: 1024 R, then 1024 G, then 1024 B, row-major

# name -> (inner folder, training files, test files, meta file, label key, class-name key, number of classes)
_LAYOUTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str, bytes, bytes, int]] = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                "batches.meta", b"labels", b"label_names", 10),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names", 100),
}


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a pickled numpy array needs, under both numpy 1.x and 2.x module names."""
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
        from numpy.core.numeric import _frombuffer  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):  # files written by either numpy name the module their way
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer  # pickle protocol 5 arrays
    return allowed


_ALLOWED_GLOBALS = _numpy_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the numpy names in _ALLOWED_GLOBALS; anything else is refused."""

    def __init__(self, file: Any, path: Path) -> None:
        # encoding="bytes": the official files were written by Python 2, whose str must stay bytes for
        # numpy to rebuild the arrays' raw data.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"{self._path}: refusing to load {module}.{name} from this pickle; a CIFAR file only "
                            f"holds numpy arrays, lists and strings (is the file tampered with?)") from None


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickle `path`, resolving nothing but numpy arrays; DataError naming the file when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError, UnicodeDecodeError) as e:
        # Truncated or corrupt files fail in many ways depending on where the damage is.
        raise DataError(f"{path}: not a readable pickle (truncated or corrupt?): {type(e).__name__}: {e}") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def find_cifar(root: str | os.PathLike) -> Optional[CifarName]:
    """Which CIFAR layout `root` holds ("cifar10" or "cifar100"), or None. Only checks the meta file exists."""
    try:
        _resolve(root, "cifar10")
        return "cifar10"
    except DataError:
        pass
    try:
        _resolve(root, "cifar100")
        return "cifar100"
    except DataError:
        return None


def read_cifar(root: str | os.PathLike, name: CifarName, train: bool) -> ImageArrays:
    """Read the training (`train=True`) or test split of CIFAR-10 / CIFAR-100 from its python-pickle folder.

    Returns images (N, 3, 32, 32) uint8, labels int64 (CIFAR-100: the 100 fine labels) and class names.
    """
    if name not in _LAYOUTS:
        raise ValueError(f"unknown CIFAR name {name!r}; expected one of {', '.join(_LAYOUTS)}")
    folder = _resolve(root, name)
    _, train_files, test_files, meta_file, label_key, names_key, num_classes = _LAYOUTS[name]
    meta_path = folder / meta_file
    names = _get(load_pickle(meta_path), names_key, meta_path)
    if not isinstance(names, (list, tuple)):
        raise DataError(f"{meta_path}: class names must be a list, found {type(names).__name__}")
    classes = [_to_str(c, meta_path) for c in names]
    if len(classes) != num_classes:
        raise DataError(f"{meta_path}: expected {num_classes} class names, found {len(classes)}")

    images, labels = [], []
    for file_name in train_files if train else test_files:
        path = folder / file_name
        batch = load_pickle(path)
        data = _get(batch, b"data", path)
        lab = _get(batch, label_key, path)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
            raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, {_ROW}), found "
                            f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
        try:
            lab = np.asarray(lab, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as e:
            raise DataError(f"{path}: labels are not integers: {e}") from e
        if lab.shape != (data.shape[0],):
            raise DataError(f"{path}: {data.shape[0]} images but labels of shape {lab.shape}")
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise DataError(f"{path}: labels span [{lab.min()}, {lab.max()}], outside [0, {num_classes})")
        images.append(data)
        labels.append(lab)

    # Concatenate (or copy) so the result owns writable memory: arrays rebuilt from pickled bytes are
    # read-only, which torch.from_numpy warns about.
    data = np.concatenate(images) if len(images) > 1 else images[0].copy()
    return ImageArrays(
        images=torch.from_numpy(data.reshape(-1, 3, _IMAGE_SIZE, _IMAGE_SIZE)),
        labels=torch.from_numpy(np.concatenate(labels)),
        classes=classes,
        source=str(folder),
    )


def _resolve(root: str | os.PathLike, name: str) -> Path:
    """The folder holding `name`'s files: root/<inner folder>, or root itself."""
    root = Path(root)
    inner, _, _, meta_file, *_ = _LAYOUTS[name]
    if not root.is_dir():
        raise DataError(f"{name} folder not found: {root}")
    for folder in (root / inner, root):
        if (folder / meta_file).is_file():
            return folder
    raise DataError(f"no {name} data in {root}: expected {root / inner / meta_file} (or {root / meta_file}); "
                    f"download and unpack the python version of {name.upper()} there")


def _get(obj: Any, key: bytes, path: Path) -> Any:
    # Files pickled by Python 3 can have str keys where the official Python 2 files have bytes.
    if isinstance(obj, dict):
        for k in (key, key.decode()):
            if k in obj:
                return obj[k]
    found = sorted(map(repr, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
    raise DataError(f"{path}: expected a dict with key {key.decode()!r}, found {found}")


def _to_str(value: Any, path: Path) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    raise DataError(f"{path}: class names must be strings, found {type(value).__name__}")
