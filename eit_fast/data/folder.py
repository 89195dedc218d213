"""ImageFolder trees (root/<class name>/<image files>), decoded once into one in-memory uint8 tensor.

Classes are the sub-folders of root sorted by name, as torchvision's ImageFolder does; images may sit in
nested folders under their class folder. Hidden files and folders (".name") are ignored. Decoding runs
on a thread pool (Pillow releases the GIL while it decodes), and the result can be cached on disk as a
safetensors file keyed by the folder's contents, so that later runs skip decoding altogether.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .arrays import DataError, ImageArrays

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_CACHE_FORMAT = "eit_fast.imagefolder.v1"
_CHUNK = 256  # images per thread-pool task: amortises the task overhead over many small images
_BICUBIC = getattr(Image, "Resampling", Image).BICUBIC  # Image.Resampling appeared in Pillow 9.1


def scan_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[int], list[str]]:
    """List the images of an ImageFolder tree: (paths, labels, class names).

    Classes are sorted by name and label i is classes[i]; files are sorted within each class.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    try:
        with os.scandir(root) as it:
            classes = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    except OSError as e:
        raise DataError(f"cannot list image folder {root}: {e}") from e
    if not classes:
        raise DataError(f"{root} has no class sub-folders: expected the ImageFolder layout "
                        f"{root}/<class name>/<image files>")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = root / name
        files = _list_images(class_dir)
        if not files:
            raise DataError(f"empty class {name!r}: {class_dir} holds no image files "
                            f"(looked for {' '.join(IMAGE_EXTENSIONS)})")
        paths.extend(class_dir / f for f in files)
        labels.extend([label] * len(files))
    return paths, labels, classes


def _list_images(class_dir: Path) -> list[str]:
    """Image files under class_dir, as sorted relative paths."""
    def fail(e: OSError) -> None:
        raise DataError(f"cannot list {e.filename or class_dir}: {e.strerror or e}") from e

    found: list[str] = []
    seen: set[str] = set()
    # followlinks like torchvision; `seen` stops a symlink cycle from walking forever.
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=fail, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, class_dir)
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(f if rel == os.curdir else os.path.join(rel, f))
    found.sort()
    return found


def decode_images(paths: Sequence[str | os.PathLike], img_size: Optional[int] = None,
                  num_threads: Optional[int] = None) -> torch.Tensor:
    """Decode `paths` into one uint8 tensor (N, 3, H, W), in order.

    Images are converted to RGB. With img_size, any image that is not img_size x img_size is resized
    (shorter side to img_size, bicubic) and centre-cropped; without it, all images must share one size.
    """
    if not paths:
        raise ValueError("decode_images: no paths given")
    if img_size is not None and img_size < 1:
        raise ValueError(f"decode_images: img_size must be a positive integer or None, got {img_size}")
    threads = num_threads or _default_threads()
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    out: Optional[np.ndarray] = None
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
    # Set when the main thread leaves (an error, or a stop request raised by a signal handler): the chunks
    # under way stop after their current image instead of decoding the rest for nothing.
    cancelled = threading.Event()

    def decode_chunk(chunk):
        arrays = []
        for p in chunk:
            if cancelled.is_set():
                return arrays
            arrays.append(_decode_one(Path(p), img_size))
        return arrays
    try:
        i = 0
        for arrays in pool.map(decode_chunk, chunks):
            for arr in arrays:
                if out is None:
                    out = np.empty((len(paths), 3, arr.shape[0], arr.shape[1]), dtype=np.uint8)
                elif arr.shape[:2] != out.shape[2:]:
                    raise DataError(
                        f"{paths[i]} is {arr.shape[1]}x{arr.shape[0]} pixels but {paths[0]} is "
                        f"{out.shape[3]}x{out.shape[2]}; all images must share one size, or pass img_size "
                        f"to resize them")
                out[i] = arr.transpose(2, 0, 1)
                i += 1
    finally:
        cancelled.set()
        pool.shutdown(wait=True, cancel_futures=True)
    assert out is not None
    return torch.from_numpy(out)


def _default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def _decode_one(path: Path, img_size: Optional[int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()  # Image.open reads only the header: decode here, inside the try
            rgb = to_rgb(im)
            if img_size is not None and rgb.size != (img_size, img_size):
                rgb = _resize_centre_crop(rgb, img_size)
            return np.asarray(rgb)
    except Exception as e:  # a corrupt file fails in whatever way the image plugin fails
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit greyscale (PNG gives "I;16" or "I")


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB image. 16-bit greyscale is scaled (65535 -> 255): PIL's convert() would clip it at 255."""
    if im.mode in _HIGH_BIT_MODES:
        a = np.asarray(im).astype(np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # mode L
    return im if im.mode == "RGB" else im.convert("RGB")  # convert() would copy an RGB image (~15%)


def _resize_centre_crop(im: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bicubic), then the central size x size square: torchvision's Resize(size)
    followed by CenterCrop(size)."""
    w, h = im.size
    if w <= h:
        new_w, new_h = size, max(size, int(size * h / w))
    else:
        new_w, new_h = max(size, int(size * w / h)), size
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), _BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def decode_folder(root: str | os.PathLike, img_size: Optional[int] = None,
                  cache_dir: Optional[str | os.PathLike] = None,
                  num_threads: Optional[int] = None) -> ImageArrays:
    """Decode a whole ImageFolder tree into memory (see decode_images for img_size).

    With cache_dir, the decoded tensors are saved there, named by a hash of the folder's path, img_size
    and every file's relative path, size and mtime; a later call on an unchanged folder loads that file
    instead of decoding. A cache file that fails any check is ignored (with a warning) and rewritten.
    """
    root = Path(root)
    paths, label_list, classes = scan_image_folder(root)
    labels = torch.tensor(label_list, dtype=torch.int64)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"imagefolder-{_cache_key(root, paths, img_size)}.safetensors"
        images = _load_cache(cache_file, classes, labels, img_size)
        if images is not None:
            return ImageArrays(images=images, labels=labels, classes=classes, source=str(root))
    images = decode_images(paths, img_size=img_size, num_threads=num_threads)
    if cache_file is not None:
        _save_cache(cache_file, images, labels, classes, root, img_size)
    return ImageArrays(images=images, labels=labels, classes=classes, source=str(root))


def _cache_key(root: Path, paths: list[Path], img_size: Optional[int]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_CACHE_FORMAT, str(root.resolve()), img_size]).encode())
    entries = []
    for p in paths:
        try:
            st = p.stat()
        except OSError as e:
            raise DataError(f"cannot read image {p}: {e}") from e
        entries.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    for rel, size, mtime_ns in sorted(entries):
        h.update(b"\0" + os.fsencode(rel) + f"\0{size}\0{mtime_ns}".encode())
    return h.hexdigest()[:32]


def _digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    # Guards against bit rot and partial writes that the safetensors header alone would not reveal.
    h = hashlib.sha256()
    h.update(images.numpy())
    h.update(labels.numpy())
    return h.hexdigest()


def _load_cache(path: Path, classes: list[str], labels: torch.Tensor,
                img_size: Optional[int]) -> Optional[torch.Tensor]:
    if not path.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            images, cached_labels = f.get_tensor("images"), f.get_tensor("labels")
        problem = None
        if meta.get("format") != _CACHE_FORMAT:
            problem = f"format {meta.get('format')!r}, expected {_CACHE_FORMAT!r}"
        elif json.loads(meta.get("classes", "null")) != classes:
            problem = "its class names differ from the folder's"
        elif cached_labels.dtype != torch.int64 or not torch.equal(cached_labels, labels):
            problem = "its labels differ from the folder's"
        elif (images.dtype != torch.uint8 or images.dim() != 4 or images.shape[:2] != (len(labels), 3)
              or (img_size is not None and images.shape[2:] != (img_size, img_size))):
            problem = f"its images are {images.dtype} {tuple(images.shape)}"
        elif meta.get("sha256") != _digest(images, cached_labels):
            problem = "its contents do not match their checksum"
    except Exception as e:  # safetensors, JSON or a missing tensor: whatever is wrong, do not trust it
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        warnings.warn(f"ignoring the image cache {path} ({problem}); decoding the images again", stacklevel=3)
        return None
    return images.contiguous()


def _save_cache(path: Path, images: torch.Tensor, labels: torch.Tensor, classes: list[str], root: Path,
                img_size: Optional[int]) -> None:
    from safetensors.torch import save_file

    from ..fileio import WriteError, atomic_write
    metadata = {"format": _CACHE_FORMAT, "classes": json.dumps(classes), "root": str(root.resolve()),
                "img_size": json.dumps(img_size), "sha256": _digest(images, labels)}
    # Atomic (a temporary file of its own, then a rename): readers never see a half-written file, and
    # concurrent writers each finish their own.
    try:
        atomic_write(path, lambda tmp: save_file({"images": images, "labels": labels}, tmp, metadata=metadata),
                     what="image cache", size_hint=images.numel() + labels.numel() * 8)
    except WriteError as e:
        # The decoded data is fine; only the cache is lost, so the caller goes on without it.
        warnings.warn(f"{e}; going on without the cache (the images are decoded again next time)", stacklevel=3)
