"""Evaluation: top-1 / top-5 / loss over a loader (all ranks summed), and `python -m eit_fast.evaluate`."""
from __future__ import annotations

import argparse
import contextlib
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


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, amp: str = "none") -> dict:
    """Loss and top-1/top-5 accuracy (%) over every sample of `loader`, summed across ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    start = time.perf_counter()
    for batch in loader.batches(0):
        with autocast(device, amp):
            logits = model(batch.images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == batch.labels.view(-1, 1)
        sums += torch.stack([F.cross_entropy(logits, batch.labels, reduction="sum").double(),
                             hit[:, :1].sum().double(), hit.sum().double(),
                             torch.tensor(float(len(batch.labels)), dtype=torch.float64, device=device)])
    all_reduce_sum(sums)
    seconds = time.perf_counter() - start
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise ValueError("the evaluation set is empty")
    return {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": int(n),
            "seconds": seconds}


def main(argv=None) -> int:
    from . import create_model
    from .checkpoint import CheckpointError, check_state_dict, extract_state_dict, read_file
    from .configs import EITConfig
    from .data.build import DataSpec, build_data
    from .models import EIT

    parser = argparse.ArgumentParser(prog="python -m eit_fast.evaluate", description=__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="an eit_fast checkpoint (its config rebuilds the model), a .safetensors export, "
                             "the authors' checkpoint or a bare state_dict (these need --model)")
    parser.add_argument("--data", required=True, help="'synthetic', a CIFAR python folder, or a folder with "
                                                      "train/ and val/ (or test/) ImageFolder trees")
    parser.add_argument("--model", help="named config, for files that do not carry their config")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--amp", choices=sorted(AMP_DTYPES), default=None,
                        help="autocast dtype (default: bf16 on CUDA, none on the CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="for 'synthetic': the training run's --seed")
    args = parser.parse_args(argv)

    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    try:
        obj = read_file(args.checkpoint)
        config = obj.get("config") if isinstance(obj, dict) else None
        if isinstance(config, dict) and "model_config" in config:
            model = EIT(EITConfig(**config["model_config"]))
        elif args.model:
            model = create_model(args.model)
        else:
            print(f"error: {args.checkpoint} carries no model config; pass --model NAME", file=sys.stderr)
            return 2
        sd = extract_state_dict(obj, use_ema=args.ema, source=args.checkpoint)
        check_state_dict(model, sd, source=args.checkpoint)
        model.load_state_dict(sd)
    except (CheckpointError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.to(device)
    cfg = model.cfg
    spec = DataSpec(data=args.data, img_size=cfg.img_size, batch_size=args.batch_size, workers=args.workers)
    data = build_data(spec, device=device, seed=args.seed, train=False)
    if len(data.classes) != cfg.num_classes:
        print(f"error: the model has {cfg.num_classes} classes, {args.data} has {len(data.classes)}",
              file=sys.stderr)
        return 2
    r = evaluate(model, data.val, device, amp)
    print(f"{args.checkpoint}{' (EMA)' if args.ema else ''} on {data.description}")
    print(f"top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}  "
          f"{r['images']} images in {r['seconds']:.1f} s ({r['images'] / r['seconds']:.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
