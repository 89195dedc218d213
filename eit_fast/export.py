"""python -m eit_fast.export CHECKPOINT --format onnx|safetensors|torchscript|exported-program

Rebuilds the model a checkpoint describes (as `python -m eit_fast.evaluate` does: a run folder of
`python -m eit_fast.train`, a checkpoint, or a .safetensors export), writes it in the chosen format with its
preprocessing and class names in the file's metadata, loads the file back and compares it with PyTorch on a
few images at other batch sizes (onnxruntime for ONNX, when installed), and prints the largest difference.
The file is moved into place only if that check passes. `--validate DATA` also runs the export and PyTorch
over a data set's evaluation split and reports both top-1 accuracies.

The export holds the reference math whatever the model was trained with: fused modules are swapped back to
the reference ones first, so the ONNX graph is standard ONNX operators only (Conv, MaxPool, MatMul, Softmax,
LayerNormalization, ...), with a dynamic batch (and a dynamic image size for models built with
dynamic_img_size). Library use: eit_fast.deploy.export_model(model, path, format).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .deploy.formats import FORMATS
from .deploy.onnx import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET


def default_output(source: Path, suffix: str, ema: bool) -> Path:
    """Beside the weights file: best.pt -> best.onnx (best_ema.onnx for --ema)."""
    stem = source.name.split(".")[0]
    if ema and not stem.endswith("_ema"):
        stem += "_ema"
    return source.with_name(stem + suffix)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _shapes(shapes) -> str:
    batches = sorted({s[0] for s in shapes})
    sizes = list(dict.fromkeys(f"{s[2]}x{s[3]}" for s in shapes))
    return f"batch {', '.join(map(str, batches))}; {', '.join(sizes)} px"


def main(argv=None) -> int:
    from . import stop
    from .checkpoint import CheckpointError
    from .configs import ConfigError
    from .data.arrays import DataError
    from .deploy import ExportError
    from .fileio import WriteError

    parser = argparse.ArgumentParser(prog="python -m eit_fast.export", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a run folder of eit_fast.train (its best.pt, else final.safetensors, else the newest "
                             "checkpoint that verifies), an eit_fast checkpoint or .safetensors export, or the "
                             "authors' checkpoint / a bare state_dict with --model")
    parser.add_argument("--format", default="onnx", metavar="FORMAT",
                        help=f"{' | '.join(FORMATS)} (default: onnx)")
    parser.add_argument("--output", help="file to write (default: beside the weights, e.g. RUN/best.onnx)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights of a training checkpoint")
    parser.add_argument("--model", help="named config, for files that do not carry their config")
    parser.add_argument("--validate", metavar="DATA",
                        help="also run the export and PyTorch over DATA's evaluation split ('synthetic', a CIFAR "
                             "python folder, or a folder with train/ and val/ ImageFolder trees) and report both "
                             "top-1 accuracies")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per batch of --validate (default 32); the check after writing runs at most "
                             "8 and 1")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    args = parser.parse_args(argv)
    done: list[Path] = []  # the file once it is written and checked
    with stop.handling(raising=True):  # SIGTERM/SIGINT: stop at once; a half-written export is removed
        try:
            _export(args, done)
        except (CheckpointError, ConfigError, DataError, ExportError, WriteError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except stop.Stopped as e:
            return stop.report_stopped(e, f"while validating {done[0]} (written and checked)" if done
                                       else "before the export was written")
    return 0


def _export(args, done: list):
    from .deploy import ExportError, check_runtime, export_model, load_exported
    from .deploy.base import check_output_path, dynamic_size
    from .deploy.check import validate
    from .deploy.onnx import check_opset
    from .evaluate import load_model_for_eval
    from .run_folder import checkpoint_to_evaluate
    from .settings import POSITIVE, check_ranges

    check_ranges(args, {"batch_size": POSITIVE, "opset": POSITIVE})
    # Everything that can be refused cheaply is refused before the checkpoint is read.
    fmt = FORMATS.get(args.format)
    if fmt is None:
        raise ExportError(f"argument --format: unknown format {args.format!r}; choose one of {', '.join(FORMATS)}")
    check_runtime(args.format, need_runner=args.validate is not None)
    if args.format == "onnx":
        check_opset(args.opset)
    source, obj, use_ema = Path(args.checkpoint), None, args.ema
    if source.is_dir():
        source, obj, use_ema, why = checkpoint_to_evaluate(source, args.ema)
        print(f"{args.checkpoint} is a run folder: exporting {source.name}, {why}", flush=True)
    output = Path(args.output) if args.output else default_output(source, fmt.suffix, args.ema)
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise ExportError(f"the output {output} is the checkpoint itself; choose another --output")
    check_output_path(output)
    model, run_args, classes = load_model_for_eval(str(source), args.model, use_ema, obj)
    data = _eval_data(args.validate, model, run_args, classes, args.batch_size) if args.validate else None
    extra = {"source": source.name, "ema": json.dumps(bool(args.ema))}
    if args.format == "safetensors" and run_args:  # evaluate reads the run's seed and data size from it
        extra["train_args"] = json.dumps(run_args)
    r = export_model(model, output, args.format, opset=args.opset, name=args.model or run_args.get("model"),
                     classes=classes, metadata=extra, batch_size=args.batch_size)
    done.append(output)
    kind = f"ONNX opset {args.opset}" if args.format == "onnx" else args.format
    if args.format != "safetensors":
        kind += ", dynamic batch" + (", height and width" if dynamic_size(model) else "")
    print(f"wrote {output} ({_size(r['bytes'])}, {kind})")
    if r["check"] is not None:
        c = r["check"]
        print(f"checked with {fmt.what} against PyTorch on {c['images']} images ({_shapes(c['shapes'])}): "
              f"max abs difference {c['max_abs']:.2e}, relative {c['relative']:.2e}")
    else:
        print(f"note: {r['note']}", file=sys.stderr)
    if data is not None:
        v = validate(model, load_exported(output, args.format), data.val)
        print(f"validated on {data.description}: PyTorch top-1 {v['top1_pytorch']:.2f}%, {args.format} top-1 "
              f"{v['top1_export']:.2f}%; predictions agree on {v['agree']:.2f}% of {v['images']} images; "
              f"max abs logit difference {v['max_abs']:.2e}")


def _eval_data(data: str, model, run_args: dict, classes, batch_size: int):
    """The evaluation split of `data`, as `python -m eit_fast.evaluate` builds it (the run's seed and
    synthetic size, labels in the checkpoint's class order)."""
    from .data.arrays import DataError
    from .data.build import DataSpec, build_data
    cfg = model.cfg
    spec = DataSpec(data=data, img_size=cfg.img_size, batch_size=batch_size,
                    synthetic_size=run_args.get("synthetic_size", 8000))
    out = build_data(spec, device="cpu", seed=run_args.get("seed", 0), train=False, classes=classes)
    if len(out.classes) != cfg.num_classes:
        raise DataError(f"{data} has {len(out.classes)} classes, the model {cfg.num_classes}")
    return out


if __name__ == "__main__":
    sys.exit(main())
