"""The in-memory form every reader returns, and the error every reader raises for bad data."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class DataError(ValueError):
    """Data that cannot be read: a missing folder or file, an empty class, a corrupt image or pickle, ...

    Every message names the offending path, so that the user knows what to fix.
    """


@dataclass
class ImageArrays:
    """A whole decoded data set held in memory.

    images: uint8, shape (N, 3, H, W), contiguous, on the CPU.
    labels: int64, shape (N,), each in [0, len(classes)).
    classes: class names; labels index into this list.
    source: where the data came from (a path, or "synthetic(...)"), for logs and error messages.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str

    def __post_init__(self) -> None:
        # Check once here, so that nothing downstream has to guess what a reader produced.
        im, lab = self.images, self.labels
        if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] != 3:
            raise DataError(f"{self.source}: images must be a uint8 tensor of shape (N, 3, H, W), got "
                            f"{getattr(im, 'dtype', type(im).__name__)} {tuple(getattr(im, 'shape', ()))}")
        if not isinstance(lab, torch.Tensor) or lab.dtype != torch.int64 or lab.shape != (im.shape[0],):
            raise DataError(f"{self.source}: labels must be an int64 tensor of shape ({im.shape[0]},), got "
                            f"{getattr(lab, 'dtype', type(lab).__name__)} {tuple(getattr(lab, 'shape', ()))}")
        if im.device.type != "cpu" or lab.device.type != "cpu":
            raise DataError(f"{self.source}: images and labels must be on the CPU")
        if not self.classes:
            raise DataError(f"{self.source}: no class names")
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= len(self.classes)):
            raise DataError(f"{self.source}: labels span [{int(lab.min())}, {int(lab.max())}] but there are "
                            f"{len(self.classes)} classes")
        if not im.is_contiguous():
            self.images = im.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])
