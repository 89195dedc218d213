"""`python -m eit_fast.analyze SOURCE [SOURCE ...] --data DATA --output DIR`: attention distance, head
diversity and high-frequency share (eit_fast.analysis, our reconstructions of the EIT paper's analyses) of
each model, written as DIR/analysis.json and one side-by-side plot DIR/analysis.png.

A SOURCE is a checkpoint or .safetensors export written by eit_fast.train (rebuilt from its recorded config,
as `eit_fast.evaluate` does; `--model NAME` for files that carry none), a run folder (its best.pt, else its
final export, else its newest readable checkpoint), or a named config (freshly initialised: what the measures
look like at init). `--label` names them in the plot and the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def load_source(source: str, model_name: str | None, use_ema: bool, overrides: dict):
    """(model, training seed or None) for a checkpoint path or a named config."""
    from .configs import CONFIGS, ConfigError, get_config
    from .evaluate import load_model_for_eval
    from .models import EIT

    if os.path.isdir(source):  # a run folder, as `evaluate --checkpoint RUN_DIR` takes it
        from .run_folder import checkpoint_to_evaluate
        path, obj, use_ema, why = checkpoint_to_evaluate(source, use_ema)
        print(f"{source} is a run folder: analysing {path.name}, {why}", flush=True)
        model, run_args, _ = load_model_for_eval(str(path), model_name, use_ema, obj)
        return model, run_args.get("seed")
    if os.path.exists(source):
        model, run_args, _ = load_model_for_eval(source, model_name, use_ema)
        return model, run_args.get("seed")
    if source in CONFIGS:
        return EIT(get_config(source, **overrides)), None
    raise ConfigError(f"{source!r} is neither a file nor a named config ({', '.join(sorted(CONFIGS))})")


def parse_overrides(items: list[str]) -> dict:
    """KEY=VALUE pairs, values read as JSON (2, null, "timm") with a bare word taken as a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def spread_batches(loader, images: int, batch_size: int):
    """`images` validation images spread evenly over the split, in batches: ImageFolder splits are sorted by
    class, so the first images would all be of one class."""
    stride = max(1, loader.num_samples // images)
    picked, seen, count = [], 0, 0
    for batch in loader.batches(0):
        idx = torch.arange(seen, seen + len(batch.images), device=batch.images.device)
        seen += len(batch.images)
        x = batch.images[idx % stride == 0][: images - count]
        picked.append(x)
        count += len(x)
        if count >= images:
            break
    x = torch.cat(picked)
    yield from x.split(batch_size)


def write_outputs(results: dict, out: Path):
    """analysis.json and analysis.png, each written atomically (eit_fast.fileio)."""
    from .analysis import plot
    from .fileio import atomic_write, atomic_write_text

    def write_png(tmp: str):
        import matplotlib
        with matplotlib.rc_context({"savefig.format": "png"}), open(tmp, "wb") as f:  # a file object: the
            plot(results, f)                                                       # name ends in .tmp
    atomic_write_text(out / "analysis.json", json.dumps(results, indent=1), what="analysis results")
    atomic_write(out / "analysis.png", write_png, what="analysis plot")


def main(argv=None) -> int:
    from . import stop
    from .analysis import analyze

    parser = argparse.ArgumentParser(prog="python -m eit_fast.analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="checkpoint / .safetensors path, or a "
                                                                      "named config")
    parser.add_argument("--data", default="synthetic", help="'synthetic', a CIFAR python folder, or a folder "
                                                            "with train/ and val/ (or test/) ImageFolder trees")
    parser.add_argument("--output", required=True, help="folder for analysis.json and analysis.png")
    parser.add_argument("--label", action="append", default=[], help="a plot label per SOURCE, in order")
    parser.add_argument("--model", help="named config for files that do not carry their config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an EITConfig override for every named-config source, e.g. --set num_cls_tokens=2 "
                             "(checkpoints rebuild the model they record)")
    parser.add_argument("--ema", action="store_true", help="the EMA weights of a training checkpoint")
    parser.add_argument("--images", type=int, default=256, help="validation images to analyse (default 256)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cutoff", type=float, default=0.25,
                        help="radial frequency, in cycles per token, above which energy counts as high")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, help="'synthetic' only: the data seed (default: the "
                                                 "checkpoint's training seed, else 0)")
    args = parser.parse_args(argv)
    with stop.handling(raising=True):  # SIGTERM/SIGINT: stop at once (nothing is written until the end)
        try:
            return _analyze(args, analyze)
        except stop.Stopped as e:
            return stop.report_stopped(e, "during the analysis")


def _analyze(args, analyze) -> int:
    from .checkpoint import CheckpointError
    from .configs import ConfigError
    from .data.arrays import DataError
    from .data.build import DataSpec, build_data
    from .settings import resolve_device

    labels = args.label or [Path(s).stem if os.path.exists(s) else s for s in args.sources]
    try:
        if len(labels) != len(args.sources):
            raise ValueError(f"{len(labels)} --label for {len(args.sources)} sources")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must differ, got {labels} (name them with --label)")
        if args.images < 1 or args.batch_size < 1:
            raise ValueError("--images and --batch-size must be at least 1")
        overrides = parse_overrides(args.set)
        device = resolve_device(args.device)
        results = {}
        for source, label in zip(args.sources, labels):
            model, train_seed = load_source(source, args.model, args.ema, overrides)
            cfg = model.cfg
            if not isinstance(cfg.img_size, int):
                raise ConfigError(f"{source}: the data readers take square images, the model is {cfg.img_size}")
            seed = args.seed if args.seed is not None else (train_seed or 0)
            # synthetic: a set whose validation split holds just the images analysed
            spec = DataSpec(data=args.data, img_size=cfg.img_size, batch_size=args.batch_size, workers=0,
                            synthetic_size=4 * args.images)
            data = build_data(spec, device=device, seed=seed, train=False)
            model = model.to(device)

            r = analyze(model, spread_batches(data.val, args.images, args.batch_size), cutoff=args.cutoff)
            r.update(source=source, data=data.description, config=cfg.to_dict())
            results[label] = r
            layers = ", ".join(f"{e['mean_distance_px']:.1f}" if "mean_distance_px" in e else "-"
                               for e in r["layers"])
            print(f"{label}: {r['images']} images; mean attention distance per layer (px): {layers}")
        out = Path(args.output)
        write_outputs(results, out)
    except (CheckpointError, ConfigError, DataError, ValueError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'analysis.json'} and {out / 'analysis.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
