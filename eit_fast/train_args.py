"""The settings of `python -m eit_fast.train`: flags, recipes, YAML files, and their checks."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from .configs import ConfigError, list_models
from .models.baselines import BASELINES
from .evaluate import AMP_DTYPES
from .settings import NON_NEGATIVE, POSITIVE, PROBABILITY, RATE, SEED, Range, check_ranges, convert_setting, flag

DESCRIPTION = """Train EIT with mixed precision on one GPU, many (torchrun), or the CPU.

With no arguments it trains a small EIT on the built-in procedural data set (a smoke run that finishes in a
few minutes on a laptop CPU). Recipes: `--recipe cifar` (our small-data recipe for eit_cifar; its warm-up,
lr, Mixup/CutMix and dropout rates follow --epochs), `--recipe deit` (the authors' ImageNet recipe,
DeiT's). Settings come from, lowest to highest: the built-in defaults, the recipe, a YAML `--config` file,
the command line. Every value is range-checked before any work.

Checkpoints are written atomically with a checksum and hold everything a resume needs (model, EMA, optimizer,
scheduler, grad scaler, every rank's RNG state, epoch and position within it, a fingerprint of the data):
`--resume RUN_DIR` continues exactly. SIGTERM / SIGINT saves a checkpoint and exits.
"""


@dataclass(frozen=True)
class PerBudget:
    """A recipe default that depends on the run's length in epochs; resolved once the epochs are known
    (an explicit flag or YAML value replaces it)."""
    rule: Callable[[int], Any]
    text: str

    def __repr__(self) -> str:
        return self.text


def resolve_budget(args: argparse.Namespace) -> argparse.Namespace:
    for key, value in vars(args).items():
        if isinstance(value, PerBudget):
            setattr(args, key, value.rule(args.epochs))
    return args


def by_budget(short: float, long: float) -> PerBudget:
    """`short` for runs of at most SHORT_EPOCHS epochs, `long` from LONG_EPOCHS on, log-linear in between."""
    def rule(epochs: int) -> float:
        t = math.log(max(epochs, SHORT_EPOCHS) / SHORT_EPOCHS) / math.log(LONG_EPOCHS / SHORT_EPOCHS)
        return float(f"{short + (long - short) * min(t, 1.0):.4g}")
    return PerBudget(rule, f"{short:g} up to {SHORT_EPOCHS} epochs, {long:g} from {LONG_EPOCHS}, log-linear between")


SHORT_EPOCHS, LONG_EPOCHS = 10, 300

RECIPES = {
    # Our small-data recipe for 32 px images (the authors published none), for any budget (README, "The CIFAR
    # recipe at any budget"). The short end was measured on 5k CIFAR-10 images; the long end is the previous
    # recipe's (DeiT's regularisation, eit_cifar's dropout rates, lr 1e-3 at batch 128). timm's init: the authors' starts the depthwise convs
    # nearly off (std 0.033 at 200 channels) and lost 6 points at every short budget we tried.
    "cifar": dict(model="eit_cifar", epochs=300, batch_size=128, lr=by_budget(2e-3, 1e-3), lr_scale_batch=128,
                  warmup_epochs=PerBudget(lambda e: min(10.0, 0.05 * e), "5% of the run, at most 10 epochs"),
                  warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05, smoothing=0.1, crop_padding=4, ema_decay=0.9999,
                  init="timm", mixup=by_budget(0.0, 0.8), cutmix=by_budget(0.0, 1.0), drop=by_budget(0.0, 0.2),
                  attn_drop=by_budget(0.0, 0.15), drop_path=by_budget(0.0, 0.2)),
    # docs/design.md section 1.5: the authors' ImageNet recipe (DeiT's, nearly verbatim). torchvision's RandAugment has
    # no magnitude noise, so "rand-m9-mstd0.5" becomes 2 ops at magnitude 9.
    "deit": dict(model="eit_mini", epochs=300, batch_size=256, lr=1e-3, lr_scale_batch=512, warmup_epochs=5,
                 warmup_lr=1e-6, min_lr=1e-5, weight_decay=0.05, randaugment="2,9", random_erasing=0.25,
                 mixup=0.8, cutmix=1.0, smoothing=0.1, crop_padding=0, repeated_aug=3, ema_decay=0.99996,
                 amp="fp16", drop_path=0.1, workers=10),
}

# Settings of one invocation rather than of the run: a resume takes them from its own command line.
RESUME_OVERRIDABLE = {"workers", "log_every", "progress", "tensorboard", "stop_after", "keep_last",
                      "save_every", "device", "compile", "resume", "config"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eit_fast.train", description=DESCRIPTION, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML file of settings (keys are these flags' names, e.g. batch_size: 256)")
    g.add_argument("--recipe", choices=sorted(RECIPES), help="named set of defaults; flags still override it")
    g.add_argument("--output", help="run folder for checkpoints and metrics (default: runs/MODEL-TIMESTAMP)")
    g.add_argument("--resume", help="continue a run: its folder (latest checkpoint) or a checkpoint file")
    g.add_argument("--seed", type=int, default=0, help="seeds the data order, augmentation and init")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if a GPU is visible, else cpu), "
                                                    "cpu, cuda, cuda:N")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="eit_micro", help=f"named config: {', '.join(list_models())}; or a baseline: "
                                                        f"{', '.join(BASELINES)}")
    g.add_argument("--impl", default="auto", choices=["reference", "fused", "auto"],
                   help="fused kernels or the reference model (auto: fused when available)")
    g.add_argument("--img-size", type=int, help="override the model's image size")
    g.add_argument("--drop", type=float, help="dropout rate (default: the model config's)")
    g.add_argument("--attn-drop", type=float, help="attention dropout rate (default: the model config's)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate (default: the model config's)")
    g.add_argument("--init", choices=["authors", "timm", "torch"],
                   help="weight init (default: the model config's, the authors' for the paper configs)")
    g.add_argument("--attn-init", choices=["default", "impulse"],
                   help="impulse: structured attention init (closed-form fit of a shift per head)")
    g.add_argument("--impulse-window", type=int, help="window of the impulse init's shifts (odd, default 3)")
    g.add_argument("--num-cls-tokens", type=int, help="CLS tokens through every block (default 1)")
    g.add_argument("--q-rank", type=int, help="low-rank query projection of this rank (default: full)")
    g.add_argument("--k-rank", type=int, help="low-rank key projection of this rank (default: full)")
    g.add_argument("--v-rank", type=int, help="low-rank value projection of this rank (default: full)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (built-in procedural images, a smoke default), a CIFAR-10/100 python "
                        "folder, or a folder with train/ and val/ (or test/) ImageFolder trees")
    g.add_argument("--synthetic-size", type=int, default=8000, help="training images of the synthetic set (plus a quarter as many for validation)")
    g.add_argument("--train-subset", type=int, help="train on a fixed random subset of this many images")
    g.add_argument("--cache", default="auto", choices=["auto", "device", "host", "none"],
                   help="decode images once into a uint8 tensor kept on the device/host (auto: for images up "
                        "to 64 px, on the GPU when it fits); none: DataLoader workers")
    g.add_argument("--workers", type=int, default=4, help="DataLoader workers per rank (large images)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=4, help="epochs of the run (sets the schedule's length)")
    g.add_argument("--batch-size", type=int, default=128, help="images per rank per micro-batch")
    g.add_argument("--eval-batch-size", type=int, help="default: --batch-size")
    g.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (see --lr-scale-batch)")
    g.add_argument("--lr-scale-batch", type=int,
                   help="if set, the peak lr is lr * global_batch / this (DeiT: 512)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up, per step")
    g.add_argument("--warmup-lr", type=float, default=1e-6, help="learning rate at the first step")
    g.add_argument("--min-lr", type=float, default=1e-5, help="end of the cosine")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW; none on norms, biases, tokens")
    g.add_argument("--clip-grad", type=float, help="max global gradient norm (default: no clipping)")
    g.add_argument("--amp", choices=sorted(AMP_DTYPES), help="autocast dtype; fp16 adds a GradScaler "
                                                              "(default: bf16 on CUDA, none on the CPU)")
    g.add_argument("--ema-decay", type=float, default=0.99, help="EMA of the weights, updated per step (decay warmed up as in timm); 0 turns it off")
    g = p.add_argument_group("augmentation")
    g.add_argument("--crop-padding", type=int, default=4, help="random crop after zero-padding (cached path)")
    g.add_argument("--no-hflip", dest="hflip", action="store_false", help="no random horizontal flip")
    g.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="chance a batch is mixed")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="chance of CutMix when both are on")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--randaugment", help="'N,M': RandAugment with N ops at magnitude M (DataLoader path)")
    g.add_argument("--random-erasing", type=float, default=0.0, help="probability (DataLoader path)")
    g.add_argument("--repeated-aug", type=int, default=1, help="DeiT's repeated augmentation count")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept besides best.pt")
    g.add_argument("--save-every", type=int, default=1, help="save a checkpoint every N epochs")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument("--stop-after", type=int, help="stop after this optimizer step, saving a checkpoint "
                                                  "(to split a run across jobs)")
    g.add_argument("--log-every", type=int, default=20,
                   help="steps between progress updates and loss health checks (each is a host sync)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs (needs tensorboard)")
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations the user set on the command line."""
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return {act.dest for act in parser._actions if given & set(act.option_strings)}


def load_yaml(path: str, parser: argparse.ArgumentParser) -> dict:
    """The file's settings, each converted and checked as argparse would check it on the command line."""
    import yaml
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    actions = {act.dest: act for act in parser._actions if act.dest not in ("help", "config")}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {unknown}; see python -m eit_fast.train --help")
    return {k: convert_setting(actions[k], v, path) for k, v in values.items()}


def parse_args(argv=None) -> tuple[argparse.Namespace, set[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    first = parser.parse_args(argv)
    yaml_values = load_yaml(first.config, parser) if first.config else {}
    recipe = first.recipe or yaml_values.get("recipe")
    parser.set_defaults(**(RECIPES[recipe] if recipe else {}))
    parser.set_defaults(**yaml_values)
    args = resolve_budget(parser.parse_args(argv))
    check_args(args)
    return args, explicit_flags(parser, argv) | set(yaml_values)


# Every numeric flag's valid values (floats must also be finite).
RANGES = {
    "seed": SEED, "img_size": POSITIVE, "drop": RATE, "attn_drop": RATE, "drop_path": RATE,
    "impulse_window": POSITIVE, "num_cls_tokens": POSITIVE, "q_rank": POSITIVE, "k_rank": POSITIVE,
    "v_rank": POSITIVE,
    "synthetic_size": POSITIVE, "train_subset": POSITIVE, "workers": NON_NEGATIVE,
    "epochs": POSITIVE, "batch_size": POSITIVE, "eval_batch_size": POSITIVE, "accum_steps": POSITIVE,
    "lr": Range(0, lo_open=True), "lr_scale_batch": POSITIVE, "warmup_epochs": NON_NEGATIVE,
    "warmup_lr": NON_NEGATIVE, "min_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
    "clip_grad": Range(0, lo_open=True), "ema_decay": RATE,
    "crop_padding": NON_NEGATIVE, "mixup": NON_NEGATIVE, "cutmix": NON_NEGATIVE, "mixup_prob": PROBABILITY,
    "mixup_switch_prob": PROBABILITY, "smoothing": RATE, "random_erasing": PROBABILITY,
    "repeated_aug": POSITIVE, "keep_last": POSITIVE, "save_every": POSITIVE, "eval_every": POSITIVE,
    "stop_after": POSITIVE, "log_every": POSITIVE,
}


def check_args(args: argparse.Namespace):
    """Ranges of every numeric flag, and the few that depend on each other."""
    check_ranges(args, RANGES)
    for dest in ("min_lr", "warmup_lr"):
        if getattr(args, dest) > args.lr:
            raise ConfigError(f"argument {flag(dest)}: must be at most --lr ({args.lr:g}), got {getattr(args, dest):g}")
    parse_randaugment(args.randaugment)


# Model flags -> EITConfig fields; a flag left out keeps the named config's value.
MODEL_FLAGS = {"img_size": "img_size", "drop": "drop_rate", "attn_drop": "attn_drop_rate",
               "drop_path": "drop_path_rate", "init": "init", "attn_init": "attn_init",
               "impulse_window": "impulse_window", "num_cls_tokens": "num_cls_tokens", "q_rank": "q_rank",
               "k_rank": "k_rank", "v_rank": "v_rank"}


def model_overrides(args: argparse.Namespace, explicit: set[str] | None = None) -> dict:
    """EITConfig overrides from the model flags. For a baseline (a ResNet) only the flags the user set count:
    a recipe's EIT settings (drop rates, init) do not apply to it, and the baseline refuses those set by hand."""
    out = {}
    for dest, field in MODEL_FLAGS.items():
        value = getattr(args, dest)
        if value is not None and (explicit is None or dest in explicit or args.model not in BASELINES):
            out[field] = value
    return out


def parse_randaugment(spec: str | None) -> tuple[int, int] | None:
    if spec in (None, "", "none"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", str(spec))
    if not m:
        raise ConfigError(f"argument --randaugment: expects 'N,M' (ops, magnitude), e.g. 2,9; got {spec!r}")
    n, mag = int(m.group(1)), int(m.group(2))
    if n < 1 or mag > 30:  # torchvision's RandAugment has 31 magnitude bins, 0..30
        raise ConfigError(f"argument --randaugment: needs N >= 1 ops and a magnitude M in 0..30, got {spec!r}")
    return n, mag


def default_output(model: str) -> str:
    return os.path.join("runs", f"{model}-{time.strftime('%Y%m%d-%H%M%S')}")
