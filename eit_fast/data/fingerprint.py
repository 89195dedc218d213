"""A fingerprint of a data split (image count, class names, a SHA-256 of its contents), stored in training
checkpoints so that a resume on different data is refused with the difference named."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from .arrays import DataError


def split_fingerprint(items: torch.Tensor | Sequence, labels: torch.Tensor, classes: Sequence[str],
                      root: str | os.PathLike | None = None) -> dict:
    """Decoded images are hashed whole; image files by relative path and size (reading them all would cost
    as much as an epoch)."""
    h = hashlib.sha256()
    if isinstance(items, torch.Tensor):
        h.update(b"decoded" + str(tuple(items.shape)).encode())
        h.update(items.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        for p in items:
            p = Path(p)
            try:
                size = p.stat().st_size
            except OSError as e:
                raise DataError(f"cannot read image {p}: {e.strerror or e}") from e
            rel = p.relative_to(root).as_posix() if root is not None else str(p)
            h.update(f"{rel}\0{size}\0".encode())
    h.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return {"images": int(len(labels)), "classes": list(classes), "sha256": h.hexdigest()}


def class_difference(expected: Sequence[str], found: Sequence[str]) -> str:
    """Which class names one list lacks or adds relative to the other (or that only their order differs)."""
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    if not missing and not extra:
        return "the same classes in another order"
    parts = []
    if missing:
        parts.append(f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if extra:
        parts.append(f"extra {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    return ", ".join(parts)


def fingerprint_difference(old: dict, new: dict) -> str | None:
    """What changed between two fingerprints ({"train": ..., "val": ...}), or None if nothing did."""
    for split in ("train", "val"):
        a, b = old.get(split), new.get(split)
        if a is None or b is None:
            continue
        if a["classes"] != b["classes"]:
            return f"{split} classes: {class_difference(a['classes'], b['classes'])}"
        if a["images"] != b["images"]:
            return f"{split} set: {a['images']} images in the checkpoint's data, {b['images']} now"
        if a["sha256"] != b["sha256"]:
            return f"{split} set: the same {a['images']} images by count, but files or contents changed"
    return None
