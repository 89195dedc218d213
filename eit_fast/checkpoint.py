"""Reading and writing checkpoints, safely and atomically.

`load_checkpoint(model, path)` accepts:
  - eit_fast's own training checkpoints (a dict with format="eit_fast");
  - the authors' training checkpoints (dict with model / optimizer / lr_scheduler / epoch / model_ema /
    scaler / args, where args is an argparse.Namespace);
  - a bare state_dict (torch.save'd) or a .safetensors file.
Files are read with torch.load(weights_only=True), allow-listing only argparse.Namespace: no arbitrary
object is ever unpickled. Keys and shapes must match exactly; a partial load is an error.
"""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

FORMAT = "eit_fast"
FORMAT_VERSION = 1
# Prefixes that wrappers add to parameter names: DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or does not fit the model."""


def read_file(path: str | os.PathLike) -> Any:
    """Load a checkpoint file's contents without executing anything but tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).strip().splitlines()
        refused = [ln.strip() for ln in lines if "unsupported global" in ln.lower()]
        if refused:  # weights_only refused an object: we will not execute it
            raise CheckpointError(f"{path} holds objects that are not safe to load ({refused[0]}); only "
                                  f"tensors, plain containers and argparse.Namespace are accepted") from e
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt?): {lines[0] if lines else e}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from e


def extract_state_dict(obj: Any, use_ema: bool = False, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the model's state_dict inside any of the accepted checkpoint layouts."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict, found {type(obj).__name__}")
    key = "model_ema" if use_ema else "model"
    if key in obj and isinstance(obj[key], Mapping):
        sd = obj[key]
    elif use_ema:
        raise CheckpointError(f"{source}: use_ema=True but it has no 'model_ema' entry "
                              f"(keys: {sorted(map(str, obj))[:10]})")
    elif all(isinstance(v, torch.Tensor) for v in obj.values()) and obj:
        sd = obj  # a bare state_dict
    else:
        raise CheckpointError(f"{source}: found no model weights (no 'model' entry and not a bare state_dict; "
                              f"keys: {sorted(map(str, obj))[:10]})")
    out = {}
    for name, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {name!r} is a {type(value).__name__}, not a tensor")
        for prefix in _WRAPPER_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = value
    return out


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint"):
    """Raise naming every key that is missing, unexpected or of the wrong shape."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append(f"shape mismatches [{'; '.join(shapes)}]")
    if problems:
        raise CheckpointError(f"{source} does not fit this model: " + ", ".join(problems)
                              + " (was it saved from another config? see eit_fast.list_models())")


def load_checkpoint(model: nn.Module, path: str | os.PathLike, use_ema: bool = False) -> dict:
    """Load weights from `path` into `model` (strict). Returns the whole checkpoint contents."""
    obj = read_file(path)
    sd = extract_state_dict(obj, use_ema=use_ema, source=str(path))
    check_state_dict(model, sd, source=str(path))
    model.load_state_dict(sd, strict=True)
    return obj


def atomic_save(write, path: str | os.PathLike):
    """Call write(tmp_path), fsync it, then rename over `path`: a crash never leaves a partial file there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: Mapping | None = None, **extra) -> None:
    """Write an eit_fast checkpoint atomically: model weights, its config, and any extra training state."""
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": unwrap(model).state_dict()}
    if config is not None:
        obj["config"] = dict(config)
    obj.update(extra)
    atomic_save(lambda tmp: torch.save(obj, tmp), path)


def save_safetensors(path: str | os.PathLike, model: nn.Module, metadata: Mapping[str, str] | None = None):
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    atomic_save(lambda tmp: save_file(sd, tmp, metadata=dict(metadata or {})), path)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
