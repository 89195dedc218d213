"""Reading and writing checkpoints, safely, atomically and with a checksum.

`load_checkpoint(model, path)` accepts:
  - eit_fast's own training checkpoints (a dict with format="eit_fast");
  - the authors' training checkpoints (dict with model / optimizer / lr_scheduler / epoch / model_ema /
    scaler / args, where args is an argparse.Namespace);
  - a bare state_dict (torch.save'd) or a .safetensors file.
Files are read with torch.load(weights_only=True), allow-listing only argparse.Namespace: no arbitrary
object is ever unpickled. eit_fast's own files (torch.save'd checkpoints and safetensors exports) carry a
SHA-256 of their contents, verified on every read. Keys, shapes, dtypes and layouts are all checked before
the first parameter is touched; a load that fails leaves the model as it was.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .fileio import atomic_write

FORMAT = "eit_fast"
FORMAT_VERSION = 2  # 2: a "checksum" entry (SHA-256 of the rest); version 1 files have none
# Prefixes that wrappers add to parameter names: DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SAFE_GLOBALS = [argparse.Namespace]
_SHOWN = 5  # problems of one kind listed in an error message before "and N more"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or does not fit the model."""


# --- checksums -----------------------------------------------------------------------------------------------

def content_digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's contents (tensors by dtype, shape and bytes; containers in order)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any):
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        t = (t.to_dense() if t.layout != torch.strided else t).cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"D%d" % len(obj))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, argparse.Namespace):
        _feed(h, vars(obj))
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__} in a checkpoint")


def _safetensors_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    return content_digest({"tensors": {k: tensors[k] for k in sorted(tensors)},
                           "metadata": {k: metadata[k] for k in sorted(metadata) if k != "checksum"}})


def _verify(obj: Any, path: Path) -> Any:
    """Check the checksum of an eit_fast file; other layouts pass through unchanged."""
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        return obj
    if obj.get("format_version", 1) < 2:
        return obj  # written before checksums existed
    if "checksum" not in obj:
        raise CheckpointError(f"{path} is an eit_fast checkpoint without its checksum (edited or corrupt?)")
    rest = {k: v for k, v in obj.items() if k != "checksum"}
    try:
        actual = content_digest(rest)
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if actual != obj["checksum"]:
        raise CheckpointError(f"{path} is corrupt: its contents do not match the checksum stored in it")
    return rest


def find_nonfinite(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in `obj` that hold a NaN or an infinity."""
    bad = []
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            bad.append(prefix or "tensor")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            bad += find_nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad += find_nonfinite(v, f"{prefix}[{i}]")
    return bad


# --- reading -------------------------------------------------------------------------------------------------

def read_file(path: str | os.PathLike) -> Any:
    """Load a checkpoint file's contents without executing anything but tensors and plain containers.

    eit_fast's own files are verified against their stored checksum.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _explain_refusal(path, e) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                              f"{str(e).strip() or type(e).__name__}") from e
    return _verify(obj, path)


def _explain_refusal(path: Path, e: pickle.UnpicklingError) -> CheckpointError:
    """weights_only refused the file: a pickle naming objects we will not build, or bytes that are no pickle."""
    refused = [ln.strip() for ln in str(e).splitlines() if "unsupported global" in ln.lower()]
    if not refused:
        refused = [f"GLOBAL {g}" for g in _pickle_globals(path)]
    if refused:
        return CheckpointError(f"{path} holds objects that are not safe to load ({refused[0]}); only "
                               f"tensors, plain containers and argparse.Namespace are accepted")
    return CheckpointError(f"{path} is not a readable checkpoint: corrupt, or not a PyTorch or safetensors file")


def _pickle_globals(path: Path) -> list[str]:
    """The globals a pickle (plain, or a torch zip's data.pkl) names, found without executing it."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                data = z.read(names[0]) if names else b""
        else:
            data = path.read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle at all: corrupt
        return []
    allowed = {"collections.OrderedDict", "argparse.Namespace"}
    return [g for g in found if g not in allowed and not g.startswith("torch.")]


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    meta = read_safetensors_metadata(path)
    if meta.get("format") == FORMAT:
        if "checksum" not in meta:
            raise CheckpointError(f"{path} is an eit_fast export without its checksum (edited or corrupt?)")
        if _safetensors_digest(tensors, meta) != meta["checksum"]:
            raise CheckpointError(f"{path} is corrupt: its contents do not match the checksum stored in it")
    return tensors


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def metadata_json(meta: Mapping[str, str], key: str, kind: type, path) -> Any:
    """A JSON value of a safetensors export's metadata, or None if absent; CheckpointError if malformed."""
    if key not in meta:
        return None
    try:
        value = json.loads(meta[key])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its metadata entry {key!r} is not valid JSON ({e})") from e
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: its metadata entry {key!r} should be a JSON {kind.__name__}, "
                              f"found {type(value).__name__}")
    return value


# --- fitting a state_dict to a model -------------------------------------------------------------------------

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
    out, original = {}, {}
    for name, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {name!r} is a {type(value).__name__}, not a tensor")
        key = str(name)
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        if key in out:
            raise CheckpointError(f"{source}: entries {original[key]!r} and {name!r} are both the parameter "
                                  f"{key!r}; which one is meant is ambiguous")
        out[key], original[key] = value, name
    return out


def _dtype_problem(value: torch.Tensor, expected: torch.Tensor) -> str | None:
    if expected.is_floating_point():
        if not value.is_floating_point():
            return f"{value.dtype} for a {expected.dtype} parameter (only floating-point values are accepted)"
    elif value.dtype != expected.dtype:
        return f"{value.dtype}, expected {expected.dtype}"
    return None


def _summary(kind: str, items: list[str], keys: bool = False) -> str:
    """The first few items and a count of the rest: a whole model's worth would bury the cause."""
    shown = [repr(i) for i in items[:_SHOWN]] if keys else items[:_SHOWN]
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"{kind} [{(', ' if keys else '; ').join(shown)}]{more}"


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint"):
    """Raise naming the keys that are missing or unexpected, and the tensors whose shape, dtype, layout or
    device cannot be loaded (the first few of each kind, and a count)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes, dtypes, layouts = [], [], []
    for k, v in expected.items():
        if k not in sd:
            continue
        value = sd[k]
        if value.layout != torch.strided:
            layouts.append(f"{k}: {value.layout}")
        elif value.device.type == "meta":
            layouts.append(f"{k}: on the meta device (no data)")
        if value.shape != v.shape:
            shapes.append(f"{k}: checkpoint {tuple(value.shape)} vs model {tuple(v.shape)}")
        if (problem := _dtype_problem(value, v)) is not None:
            dtypes.append(f"{k}: {problem}")
    problems = []
    if missing:
        problems.append(_summary("missing keys", missing, keys=True))
    if unexpected:
        problems.append(_summary("unexpected keys", unexpected, keys=True))
    if shapes:
        problems.append(_summary("shape mismatches", shapes))
    if dtypes:
        problems.append(_summary("unusable dtypes", dtypes))
    if layouts:
        problems.append(_summary("unusable layouts", layouts))
    if problems:
        raise CheckpointError(f"{source} does not fit this model: " + ", ".join(problems)
                              + " (was it saved from another config? see eit_fast.list_models())")


def load_state_dict_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint"):
    """Validate everything, then load; if loading still fails the model's previous values are put back."""
    check_state_dict(model, sd, source)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(before[k])
        raise CheckpointError(f"{source} could not be loaded ({type(e).__name__}: {e}); the model is "
                              f"unchanged") from e


def load_checkpoint(model: nn.Module, path: str | os.PathLike, use_ema: bool = False) -> dict:
    """Load weights from `path` into `model` (strict). Returns the whole checkpoint contents."""
    obj = read_file(path)
    sd = extract_state_dict(obj, use_ema=use_ema, source=str(path))
    load_state_dict_checked(model, sd, source=str(path))
    return obj


# --- writing -------------------------------------------------------------------------------------------------

def atomic_save(write, path: str | os.PathLike, what: str = "checkpoint", size_hint: int | None = None,
                last_good: str | os.PathLike | None = None):
    """Call write(tmp_path), fsync it, then rename over `path`: a crash never leaves a partial file there.
    eit_fast.fileio.atomic_write under its older name; a failed write is a fileio.WriteError."""
    atomic_write(path, write, what, size_hint, str(last_good) if last_good else None)


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in `obj`: about the size of its file, for a full-disk message."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_checked(obj: Mapping, path: str | os.PathLike, last_good: str | os.PathLike | None = None,
                 what: str = "checkpoint"):
    """torch.save an eit_fast dict atomically, with the checksum of its contents as its last entry.

    A failed write raises fileio.WriteError naming `path`, the cause and `last_good` (a file the caller
    knows to be intact); `path` itself keeps its previous version."""
    obj = _to_cpu(dict(obj))
    obj.pop("checksum", None)
    obj["format"], obj["format_version"] = FORMAT, FORMAT_VERSION
    obj["checksum"] = content_digest(obj)
    atomic_save(lambda tmp: torch.save(obj, tmp), path, what, _nbytes(obj), last_good)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: Mapping | None = None, **extra) -> None:
    """Write an eit_fast checkpoint atomically: model weights, its config, and any extra training state."""
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": unwrap(model).state_dict()}
    if config is not None:
        obj["config"] = dict(config)
    obj.update(extra)
    save_checked(obj, path)


def save_safetensors(path: str | os.PathLike, model: nn.Module, metadata: Mapping[str, str] | None = None,
                     last_good: str | os.PathLike | None = None, what: str = "weights file"):
    """Export the weights atomically; the metadata records the format and a checksum of tensors and metadata.
    A failed write raises fileio.WriteError (see save_checked)."""
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    meta = {**dict(metadata or {}), "format": FORMAT}
    meta["checksum"] = _safetensors_digest(sd, meta)
    atomic_save(lambda tmp: save_file(sd, tmp, metadata=meta), path, what, _nbytes(sd), last_good)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
