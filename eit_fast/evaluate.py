"""Evaluation: top-1 / top-5 / loss over a loader (all ranks summed), and `python -m eit_fast.evaluate`."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

from .distributed import all_reduce_sum

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class EvaluationStopped(Exception):
    """An evaluation abandoned at a stop request (the caller saves what it has and re-runs it later)."""


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: str = "none", stop=None) -> dict:
    """Loss and top-1/top-5 accuracy (%) over every sample of `loader`, summed across ranks.

    stop: called after each batch that every rank has (so every rank calls it equally often); when it
    returns True the evaluation is abandoned with EvaluationStopped.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    count = 0
    polls = loader.batches_on_every_rank() if stop is not None else 0
    start = time.perf_counter()
    for b, batch in enumerate(loader.batches(0)):
        with autocast(device, amp):
            logits = model(batch.images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == batch.labels.view(-1, 1)
        sums += torch.stack([F.cross_entropy(logits, batch.labels, reduction="sum").double(),
                             hit[:, :1].sum().double(), hit.sum().double()])
        count += len(batch.labels)
        if b < polls and stop():
            model.train(was_training)
            raise EvaluationStopped(f"stopped after {b + 1} of {len(loader)} batches")
    totals = all_reduce_sum(torch.cat([sums, sums.new_tensor([count])]))
    seconds = time.perf_counter() - start
    model.train(was_training)
    loss, top1, top5, n = totals.tolist()
    if n == 0:
        raise ValueError("the evaluation set is empty")
    return {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": int(n),
            "seconds": seconds}


def load_model_for_eval(path: str, model_name: str | None, use_ema: bool, obj=None):
    """The model a file describes, with its weights; the training run's settings and class names when the
    file records them (else {} and None).

    eit_fast checkpoints and safetensors exports carry their model config; other files need `model_name`.
    obj: the file's contents when the caller has read them already.
    """
    from .factory import create_trainable, model_from_config
    from .checkpoint import (CheckpointError, extract_state_dict, load_state_dict_checked, metadata_json,
                             read_file, read_safetensors_metadata)
    from .configs import ConfigError

    obj = read_file(path) if obj is None else obj
    model_config, run_args, classes = None, {}, None
    if str(path).endswith(".safetensors"):
        meta = read_safetensors_metadata(path)
        model_config = metadata_json(meta, "config", dict, path)
        run_args = metadata_json(meta, "train_args", dict, path) or {}
        classes = metadata_json(meta, "classes", list, path)
    elif isinstance(obj, dict) and isinstance(obj.get("config"), dict):
        model_config = obj["config"].get("model_config")
        run_args = obj["config"].get("args", {})
        classes = obj["config"].get("classes")
    if classes is not None and not (classes and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"{path}: its class list is not a list of names")
    if not isinstance(run_args, dict):
        raise CheckpointError(f"{path}: its recorded training settings are not a mapping")
    if model_name:
        model = create_trainable(model_name)
    elif isinstance(model_config, dict):
        try:
            model = model_from_config(model_config)
        except (TypeError, ValueError, ConfigError) as e:
            raise CheckpointError(f"{path}: its recorded model config is unusable: {e}") from e
    else:
        raise CheckpointError(f"{path} carries no model config; pass --model NAME")
    sd = extract_state_dict(obj, use_ema=use_ema, source=str(path))
    load_state_dict_checked(model, sd, source=str(path))
    return model, run_args, classes


def main(argv=None) -> int:
    from . import stop

    parser = argparse.ArgumentParser(prog="python -m eit_fast.evaluate", description=__doc__, allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder of eit_fast.train (its best.pt, else final.safetensors, else the newest "
                             "checkpoint that verifies), an eit_fast checkpoint or .safetensors export (both carry "
                             "their model config and class names), the authors' checkpoint or a bare state_dict "
                             "(these need --model)")
    parser.add_argument("--data", required=True, help="'synthetic', a CIFAR python folder, or a folder with "
                                                      "train/ and val/ (or test/) ImageFolder trees")
    parser.add_argument("--model", help="named config, for files that do not carry their config")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training checkpoint "
                                                           "(of a run folder: best.pt's, else final_ema.safetensors)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch")
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None,
                        help="autocast dtype (default: bf16 on CUDA, none on the CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (large images)")
    parser.add_argument("--seed", type=int, help="'synthetic' only: the training run's --seed "
                                                 "(default: the one the checkpoint records, else 0)")
    parser.add_argument("--synthetic-size", type=int, help="'synthetic' only: the training run's "
                                                           "--synthetic-size (default: as recorded, else 8000)")
    args = parser.parse_args(argv)
    with stop.handling(raising=True):  # SIGTERM/SIGINT: stop at once (an evaluation has nothing to save)
        try:
            return _run(args)
        except stop.Stopped as e:
            return stop.report_stopped(e, "during the evaluation")


def _run(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .configs import ConfigError
    from .data.arrays import DataError
    from .data.build import DataSpec, build_data
    from .fileio import WriteError
    from .run_folder import checkpoint_to_evaluate
    from .settings import NON_NEGATIVE, POSITIVE, SEED, check_ranges, resolve_device

    try:
        check_ranges(args, {"batch_size": POSITIVE, "workers": NON_NEGATIVE, "seed": SEED,
                            "synthetic_size": POSITIVE})
        device = resolve_device(args.device)
        amp = args.amp or ("bf16" if device.type == "cuda" else "none")
        path, obj, use_ema, shown = args.checkpoint, None, args.ema, args.checkpoint
        if os.path.isdir(path):
            path, obj, use_ema, why = checkpoint_to_evaluate(path, args.ema)
            print(f"{args.checkpoint} is a run folder: evaluating {path.name}, {why}", flush=True)
            shown = str(path)
        model, run_args, classes = load_model_for_eval(str(path), args.model, use_ema, obj)
        cfg = model.cfg
        seed = args.seed if args.seed is not None else run_args.get("seed", 0)
        synthetic_size = args.synthetic_size or run_args.get("synthetic_size", 8000)
        spec = DataSpec(data=args.data, img_size=cfg.img_size, batch_size=args.batch_size,
                        workers=args.workers, synthetic_size=synthetic_size)
        data = build_data(spec, device=device, seed=seed, train=False, classes=classes)
        if len(data.classes) != cfg.num_classes:
            raise DataError(f"{args.data} has {len(data.classes)} classes, the model {cfg.num_classes}")
        if classes is None:
            print(f"note: {shown} records no class names: labels follow the data set's own class "
                  f"order", file=sys.stderr)
        r = evaluate(model.to(device), data.val, device, amp)
    except (CheckpointError, ConfigError, DataError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{shown}{' (EMA)' if args.ema else ''} on {data.description}")
    print(f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  "
          f"{r['images']} images in {r['seconds']:.1f} s ({r['images'] / r['seconds']:.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
