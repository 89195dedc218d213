"""A training run's implementation choices: made once, at the first step with the training shape, the same on
every rank, and recorded in the run folder and the checkpoints, so a resumed run runs the same code
(docs/design.md section 3).

Rank 0 measures (eit_fast.autotune.prepare on an example of the training batch's shape, with the run's
autocast), one broadcast gives every rank its choices, and every rank pins them: from then on nothing is
measured, so a later shape (a partial last batch, an uneven evaluation shard) reuses the nearest case's
choice and never starts a collective that some ranks would miss. A resumed run pins the checkpoint's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from . import autotune, distributed
from .fileio import atomic_write_json

FILE = "impl_choices.json"


def settle(model: torch.nn.Module, example_shape: tuple, device: torch.device,
           autocast: Callable[[], object], dist, saved: Optional[dict] = None,
           folder: Optional[Path] = None) -> dict:
    """Pin the run's choices (rank 0's, or `saved` from a checkpoint) and return them; rank 0 writes them
    to folder/impl_choices.json."""
    if saved is not None:
        autotune.pin(saved)
        choices = saved
    else:
        choices = None
        if dist.is_main:
            if getattr(model, "impl", "reference") != "reference":
                # An example of the batch's shape, drawn without touching the run's RNG streams.
                gen = torch.Generator(device="cpu").manual_seed(0)
                example = torch.randn(example_shape, generator=gen).to(device)
                autotune.prepare(model, example, autocast=autocast)
            choices = autotune.export()
        choices = distributed.broadcast_object(choices)
        autotune.pin(choices)
    if dist.is_main and folder is not None:
        atomic_write_json(Path(folder) / FILE, choices, what="implementation choices")
    return choices


def describe(choices: dict) -> str:
    """One line per fast path: how many cases run fused, e.g. 'patch_projection fused in 2 of 2 cases'."""
    per = {}
    for c in choices.get("choices", {}).values():
        n, fused = per.get(c["path"], (0, 0))
        per[c["path"]] = (n + 1, fused + (c["impl"] == "fused"))
    return ", ".join(f"{p} fused in {f} of {n} cases" for p, (n, f) in sorted(per.items())) or \
        "no fast path measured"
